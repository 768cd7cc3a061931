import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from trl import GRPOConfig, GRPOTrainer

from _util import changed, length_reward, logged, prompt_dataset, snapshot, trainer_args
from forking_trl import ForkingGRPOConfig, ForkingGRPOTrainer, forking_mask


# ---------------------------------------------------------------------------------------------------------------
# gradient: unselected tokens get exactly zero policy gradient


def fixed_batch(trainer, batch=4, prompt_len=5, completion_len=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1, 6:] = 0  # padding
    completion_mask[3, 3:] = 0
    return {
        "prompt_ids": torch.randint(10, vocab, (batch, prompt_len), generator=g),
        "prompt_mask": torch.ones(batch, prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(10, vocab, (batch, completion_len), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2]),
        "num_items_in_batch": completion_mask.sum(),
    }


def logps_grad(trainer, inputs):
    """Gradient of the loss with respect to the per-token log-probs, and the mask the hook returned."""
    seen = {}
    get_logps = trainer._get_per_token_logps_and_entropies
    get_mask = trainer.get_high_entropy_mask

    def capture_logps(*args, **kwargs):
        logps, entropies, aux = get_logps(*args, **kwargs)
        logps.retain_grad()
        seen["logps"] = logps
        return logps, entropies, aux

    def capture_mask(entropies, mask, threshold):
        seen["weights"] = get_mask(entropies, mask, threshold)
        seen["entropies"] = entropies.detach()
        return seen["weights"]

    trainer._get_per_token_logps_and_entropies = capture_logps
    trainer.get_high_entropy_mask = capture_mask
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return seen["logps"].grad, seen["weights"], seen["entropies"]


@pytest.fixture(scope="module")
def make_trainer(tiny_model, tmp_path_factory):
    def make(**overrides):
        args = trainer_args(tmp_path_factory.mktemp("grad"), **overrides)
        return ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())

    return make


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"])
@pytest.mark.parametrize("mode", ["top", "bottom", "random"])
def test_unselected_tokens_get_zero_policy_gradient(make_trainer, loss_type, mode):
    trainer = make_trainer(loss_type=loss_type, forking_mode=mode, forking_ratio=0.3 if mode != "bottom" else 0.7)
    inputs = fixed_batch(trainer)
    grad, weights, entropies = logps_grad(trainer, inputs)
    keep = weights.bool()
    valid = inputs["completion_mask"].bool()
    assert keep.any() and (valid & ~keep).any()
    assert torch.all(grad[~keep] == 0)  # exactly zero: dropped tokens and padding
    assert torch.all(grad[keep] != 0)
    if mode != "random":
        expected = forking_mask(entropies, valid, mode=mode, ratio=trainer.args.forking_ratio)
        assert torch.equal(keep, expected)


def test_kl_term_still_reaches_unselected_tokens(make_trainer):
    trainer = make_trainer(beta=0.1)
    inputs = fixed_batch(trainer)
    inputs["ref_per_token_logps"] = torch.full(inputs["completion_ids"].shape, -6.0)
    grad, weights, _ = logps_grad(trainer, inputs)
    dropped = inputs["completion_mask"].bool() & ~weights.bool()
    assert torch.all(grad[dropped] != 0)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo", "grpo"])
def test_kept_normalizer_scales_by_valid_over_kept(make_trainer, loss_type):
    kw = dict(loss_type=loss_type, forking_ratio=0.25, forking_selection="exact")
    grad_all, weights, _ = logps_grad(make_trainer(forking_normalizer="all", **kw), fixed_batch(make_trainer(**kw)))
    grad_kept, weights_kept, _ = logps_grad(
        make_trainer(forking_normalizer="kept", **kw), fixed_batch(make_trainer(**kw))
    )
    keep = weights.bool()
    assert torch.equal(keep, weights_kept.bool())
    valid = fixed_batch(make_trainer(**kw))["completion_mask"].bool()
    if loss_type == "grpo":  # per sequence
        factor = (valid.sum(1) / keep.sum(1).clamp(min=1)).unsqueeze(1).expand_as(keep)[keep]
    else:
        factor = valid.sum() / keep.sum()
    torch.testing.assert_close(grad_kept[keep], grad_all[keep] * factor, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# agreement with TRL's own mask


@pytest.mark.parametrize("seed", range(5))
def test_top_threshold_micro_batch_agrees_with_trl(seed):
    g = torch.Generator().manual_seed(seed)
    entropies = torch.rand(6, 40, generator=g) * 5
    mask = torch.arange(40) < torch.randint(1, 41, (6, 1), generator=g)
    fake_trainer = SimpleNamespace(accelerator=Accelerator(cpu=True))
    trl_mask = GRPOTrainer.get_high_entropy_mask(fake_trainer, entropies, mask.long(), 1 - 0.2)
    ours = forking_mask(entropies, mask, mode="top", ratio=0.2)
    assert (trl_mask ^ ours).sum().item() <= 1


# ---------------------------------------------------------------------------------------------------------------
# training smoke tests


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        dict(forking_mode="top"),
        dict(forking_mode="bottom", forking_ratio=0.8),
        dict(forking_mode="random"),
        dict(forking_mode="all"),
        dict(forking_mode="top", forking_scope="sequence", forking_selection="exact"),
        dict(forking_mode="top", forking_scope="rank", forking_normalizer="kept", loss_type="dapo"),
        dict(forking_mode="top", forking_scope="batch", forking_selection="exact"),
        dict(forking_mode="top", forking_scope="batch", num_iterations=2),
    ],
    ids=["top", "bottom", "random", "all", "sequence", "rank-kept", "batch", "batch-reuse"],
)
def test_training_smoke(tiny_model, tmp_path, overrides):
    args = trainer_args(tmp_path, **overrides)
    trainer = ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    kept = logged(trainer, "forking/kept_fraction")
    assert kept and all(math.isfinite(k) for k in kept)
    expected = 1.0 if args.forking_mode == "all" else args.forking_ratio
    tolerance = 0.12 if args.forking_selection == "threshold" or args.forking_scope == "sequence" else 0.03
    assert all(abs(k - expected) <= tolerance for k in kept), kept
    assert logged(trainer, "forking/entropy_kept")
    if args.forking_mode in ("top", "bottom"):
        assert logged(trainer, "forking/threshold")
    if args.forking_mode == "top":
        kept_h, dropped_h = logged(trainer, "forking/entropy_kept")[0], logged(trainer, "forking/entropy_dropped")[0]
        assert kept_h > dropped_h


@pytest.mark.slow
def test_drop_in_with_plain_grpo_config(tiny_model, tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        top_entropy_quantile=0.3,
    )
    trainer = ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    assert isinstance(trainer.args, ForkingGRPOConfig)
    assert (trainer.args.forking_mode, trainer.args.forking_ratio) == ("top", 0.3)
    assert trainer.args.generation_batch_size == args.generation_batch_size
    trainer.train()
    assert abs(logged(trainer, "forking/kept_fraction")[0] - 0.3) < 0.12

    default = ForkingGRPOTrainer(
        tiny_model,
        length_reward,
        args=GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8,
            num_generations=4,
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=prompt_dataset(),
    )
    assert (default.args.forking_mode, default.args.forking_ratio) == ("top", 0.2)


@pytest.mark.slow
def test_lora_trains_only_adapter_weights(tiny_model, tmp_path):
    from peft import LoraConfig

    args = trainer_args(tmp_path, learning_rate=5e-2)
    trainer = ForkingGRPOTrainer(
        tiny_model,
        length_reward,
        args=args,
        train_dataset=prompt_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    assert moved and all("lora_" in name for name in moved), moved
    assert logged(trainer, "forking/kept_fraction")


@pytest.mark.slow
def test_kept_token_counter_prints_at_logging_steps(tiny_model, tmp_path, capsys):
    trainer = ForkingGRPOTrainer(
        tiny_model, length_reward, args=trainer_args(tmp_path, max_steps=1), train_dataset=prompt_dataset()
    )
    trainer.train()
    assert "most frequent kept tokens" in capsys.readouterr().out


def test_model_card_cites_the_paper():
    assert ForkingGRPOTrainer._paper["id"] == "2506.01939"
    assert "forking-trl" in ForkingGRPOTrainer._tag_names


def test_kept_token_counter_on_a_known_batch(make_trainer):
    trainer = make_trainer(forking_log_top_tokens=2)
    trainer.model.train()
    tokenizer = trainer.processing_class
    wait, so = tokenizer.convert_tokens_to_ids(["W", "S"])
    ids = torch.tensor([[wait, so, wait, 5], [so, wait, 7, 7]])
    keep = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    trainer._count_kept_tokens(keep, ids)
    assert trainer._kept_token_counts == {wait: 3, so: 1, 7: 2}
    assert trainer.top_kept_tokens() == [("W", 3), (tokenizer.decode([7]), 2)]


# ---------------------------------------------------------------------------------------------------------------
# hardening (issue 10): each failed before its fix


def test_reward_funcs_is_optional_as_in_trl(tiny_model, tmp_path):
    # TRL 1.16: rewards may come from an environment instead; with neither, TRL's own error
    with pytest.raises(ValueError, match="No reward source provided"):
        ForkingGRPOTrainer(tiny_model, args=trainer_args(tmp_path), train_dataset=prompt_dataset())


@pytest.mark.parametrize(
    "field, value", [("forking_mode", "tpo"), ("forking_ratio", 0.0), ("forking_scope", "global")]
)
def test_fields_changed_after_the_config_are_validated_when_the_trainer_is_built(tiny_model, tmp_path, field, value):
    args = trainer_args(tmp_path)
    setattr(args, field, value)
    with pytest.raises(ValueError, match=field):
        ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())


def test_nonfinite_warning_says_the_loss_is_nan(make_trainer, caplog):
    trainer = make_trainer()
    trainer.model.train()
    entropies = torch.tensor([[0.5, float("nan"), 1.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.long)
    with caplog.at_level("WARNING", logger="forking_trl.trainer"):
        trainer._select_and_record(entropies, mask, None)
    assert "forking/nonfinite_tokens" in caplog.text and "loss and gradients are NaN" in caplog.text
    assert "receive no policy gradient" not in caplog.text


@pytest.mark.slow
def test_resume_records_fields_warns_on_change_and_restores_the_generator(tiny_model, tmp_path, caplog):
    import json
    import os

    args = trainer_args(tmp_path, forking_mode="random", save_strategy="steps", save_steps=1, max_steps=2)
    trainer = ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    saved = json.loads((checkpoint / "forking_state.json").read_text())
    assert saved["forking_mode"] == "random" and saved["forking_ratio"] == 0.2
    generator_state = torch.load(checkpoint / "forking_generator_0.pth")

    # the same fields: no warning; the generator is the checkpoint's when training resumes
    resumed = ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    with caplog.at_level("WARNING", logger="forking_trl.trainer"):
        resumed._restore_forking_state(str(checkpoint))
    assert "forking_trl" not in caplog.text
    assert torch.equal(resumed._forking_generator.get_state(), generator_state)

    # other fields: one warning naming each changed field, and training goes on
    changed_args = trainer_args(
        tmp_path, forking_mode="bottom", forking_ratio=0.8, save_strategy="steps", save_steps=1, max_steps=2
    )
    other = ForkingGRPOTrainer(tiny_model, length_reward, args=changed_args, train_dataset=prompt_dataset())
    caplog.clear()
    with caplog.at_level("WARNING", logger="forking_trl.trainer"):
        other.train(resume_from_checkpoint=str(checkpoint))
    warnings = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(warnings) == 2
    assert any("forking_mode='bottom'" in w and "forking_mode='random'" in w for w in warnings)
    assert any("forking_ratio=0.8" in w and "forking_ratio=0.2" in w for w in warnings)
    assert other.state.global_step == 2

    os.remove(checkpoint / "forking_state.json")  # a checkpoint from elsewhere: said once, not silently
    caplog.clear()
    with caplog.at_level("WARNING", logger="forking_trl.trainer"):
        other._restore_forking_state(str(checkpoint))
    assert "were not checked" in caplog.text


def test_training_logs_the_entropy_pattern_of_all_valid_tokens(make_trainer):
    from forking_trl.selection import percentiles

    trainer = make_trainer()
    trainer.model.train()
    entropies = torch.tensor([[0.001, 0.002, 0.5, 2.0], [0.005, 3.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    trainer._select_and_record(entropies, mask, None)
    metrics = trainer._metrics["train"]
    valid = [0.001, 0.002, 0.5, 2.0, 0.005, 3.0]  # padding (7.0) is not counted
    assert metrics["entropy/share_below_0.01"] == [3 / 6]
    assert [metrics[f"entropy/p{q}"][0] for q in (50, 80, 95)] == percentiles(entropies, mask, (50, 80, 95))
    assert metrics["entropy/p50"] == [pytest.approx(0.005)] and metrics["entropy/p95"] == [pytest.approx(3.0)]
    assert sorted(valid)[2] == pytest.approx(metrics["entropy/p50"][0])


def test_end_distributed_ends_training_and_waits_only_with_a_process_group(make_trainer, monkeypatch):
    # single process: no group, so end_training runs and nothing sleeps; the 2-process path (group destroyed at
    # exit on every rank) is checked by every run in tests/test_launch.py
    trainer = make_trainer()
    ended, slept = [], []
    monkeypatch.setattr(trainer.accelerator, "end_training", lambda: ended.append(True))
    monkeypatch.setattr("time.sleep", slept.append)
    trainer.end_distributed()
    assert ended == [True] and slept == []

    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    trainer.end_distributed(grace_s=0.5)
    assert ended == [True, True] and slept == [0.5]


# ---------------------------------------------------------------------------------------------------------------
# entropy methods: the trainer's whole loss against the reference formulas, on a real micro-batch of the tiny model


def reference_logps_and_entropies(trainer, inputs):
    """Per-token log-probs and entropies of the completion by TRL's own forward (its fused head: the formulas under
    test start from the log-probs), called directly, outside the trainer's hooks."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    T = inputs["completion_ids"].size(1)
    logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, ids, attention, T, compute_entropy=True
    )
    return logps, entropies


def reference_aggregate(per_token, mask, loss_type, max_completion_length):
    """TRL's normalisers, as its documentation states them (one micro-batch, no accumulation, one process)."""
    per_token = per_token * mask
    if loss_type == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return per_token.sum() / mask.sum()
    if loss_type == "dr_grpo":
        return per_token.sum() / (per_token.size(0) * max_completion_length)
    if loss_type == "dapo":
        return per_token.sum() / mask.sum()  # num_items_in_batch of a generation batch of one micro-batch
    return per_token.sum(-1).mean()  # luspo


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "luspo"])
@pytest.mark.parametrize("method", ["clip_cov", "kl_cov", "entropy_adv"])
def test_entropy_method_loss_and_gradients_match_the_reference(make_trainer, method, loss_type):
    from test_credit import EPS_LOW, ref_clip_cov, ref_entropy_adv, ref_kl_cov

    trainer = make_trainer(
        loss_type=loss_type,
        forking_mode="all",
        entropy_method=method,
        epsilon=EPS_LOW,
        temperature=0.7,
        **{  # each method's own parameters (another method's would be refused: ignored)
            "clip_cov": dict(clip_cov_ratio=0.2, clip_cov_lb=-1e3, clip_cov_ub=1e3),
            "kl_cov": dict(kl_cov_ratio=0.2),
            "entropy_adv": dict(entropy_adv_alpha=2.0),  # large enough that some tokens reach the cap |A|/kappa
        }[method],
    )
    inputs = fixed_batch(trainer)
    mask = inputs["completion_mask"].float()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        logps, _ = reference_logps_and_entropies(trainer, inputs)
    g = torch.Generator().manual_seed(1)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=g)  # off-policy
    adv = inputs["advantages"][:, None].expand_as(mask)

    trainer._forking_generator.manual_seed(5)
    loss = trainer.compute_loss(trainer.model, inputs)
    ours = torch.autograd.grad(loss, params)

    torch.manual_seed(5)  # the reference's Clip-Cov draw uses the global generator
    logps, entropies = reference_logps_and_entropies(trainer, inputs)
    old, clean = inputs["old_per_token_logps"], torch.where(mask.bool(), logps, 0.0)
    if method == "clip_cov":
        per_token = ref_clip_cov(old, clean, adv, mask, ratio=0.2, lb=-1e3, ub=1e3, eps_low=EPS_LOW, eps_high=EPS_LOW)
    elif method == "kl_cov":
        per_token = ref_kl_cov(old, clean, adv, mask, ratio=0.2, coef=1.0)
    else:
        per_token = ref_entropy_adv(
            old, clean, adv, entropies, mask, alpha=2.0, kappa=2.0, eps_low=EPS_LOW, eps_high=EPS_LOW
        )
    expected = reference_aggregate(per_token, mask, loss_type, trainer.max_completion_length)
    reference = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo"])
def test_kl_cov_penalty_is_normalised_like_the_policy_term_with_the_kept_normalizer(make_trainer, loss_type):
    """Issue 22, finding 3: with forking_normalizer="kept" the policy term is averaged over the kept tokens, and so is
    KL-Cov's penalty (it was averaged over the valid tokens: about rho times too light against the policy term)."""
    penalties = {}

    def penalty_part(normalizer):
        losses, terms = [], []
        for coef in (0.0, 1.0):
            trainer = make_trainer(
                loss_type=loss_type,
                forking_mode="top",
                forking_ratio=0.3,
                forking_normalizer=normalizer,
                entropy_method="kl_cov",
                kl_cov_ratio=0.5,
                kl_cov_coef=coef,
            )
            inputs = fixed_batch(trainer)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1
            with torch.no_grad():
                logps, _ = reference_logps_and_entropies(trainer, inputs)
            inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(
                logps.shape, generator=torch.Generator().manual_seed(1)
            )
            aggregate, select = trainer._aggregate_like_trl, trainer.get_high_entropy_mask
            trainer._aggregate_like_trl = lambda term, *a: terms.append(term.detach()) or aggregate(term, *a)
            kept = []
            trainer.get_high_entropy_mask = lambda *a: kept.append(select(*a)) or kept[-1]
            with torch.no_grad():
                losses.append(trainer.compute_loss(trainer.model, inputs))
            keep = kept[-1] != 0
        penalties[normalizer] = terms[-1]
        return (losses[1] - losses[0]).item(), keep, inputs["completion_mask"].float()

    part_all, keep, mask = penalty_part("all")
    part_kept, keep_kept, _ = penalty_part("kept")
    assert torch.equal(keep, keep_kept)
    raw = penalties["all"]  # (B, T) the penalty per token: nonzero on the penalised (kept) tokens only
    assert (raw != 0).any() and torch.all(raw[~keep] == 0)
    if loss_type == "grpo":  # per sequence: over its valid tokens / over its kept tokens
        expected_all = (raw.sum(-1) / mask.sum(-1)).mean()
        expected_kept = (raw.sum(-1) / keep.sum(-1).clamp(min=1)).mean()
    else:  # one token mean over the micro-batch
        expected_all, expected_kept = raw.sum() / mask.sum(), raw.sum() / keep.sum()
    assert part_all == pytest.approx(expected_all.item(), rel=1e-4)
    assert part_kept == pytest.approx(expected_kept.item(), rel=1e-4)
    assert part_kept > 2 * part_all  # the kept tokens are 30% of the valid ones


def test_entropy_methods_compose_with_the_forking_selection(make_trainer):
    """top 20% with entropy advantage: dropped tokens still get no gradient; kept tokens get the shaped one."""
    trainer = make_trainer(forking_mode="top", forking_ratio=0.3, entropy_method="entropy_adv", loss_type="dapo")
    inputs = fixed_batch(trainer)
    grad, weights, entropies = logps_grad(trainer, inputs)
    keep = weights != 0
    valid = inputs["completion_mask"].bool()
    assert keep.any() and (valid & ~keep).any()
    assert torch.all(grad[~keep] == 0)
    adv = inputs["advantages"][:, None].expand_as(weights)
    psi = torch.minimum(0.4 * entropies, adv.abs() / 2.0)
    torch.testing.assert_close(weights[keep], (1 + psi / adv)[keep])


@pytest.mark.parametrize("method", ["clip_cov", "kl_cov", "entropy_adv"])
def test_entropy_methods_train_and_log_their_metrics(tiny_model, tmp_path, method):
    extra = (
        {
            "kl_cov": dict(steps_per_generation=2, gradient_accumulation_steps=1),
            "clip_cov": dict(clip_cov_lb=-1e3, clip_cov_ub=1e3),
        }[method]
        if method != "entropy_adv"
        else {}
    )
    args = trainer_args(tmp_path, entropy_method=method, forking_mode="all", loss_type="dapo", **extra)
    trainer = ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    for key in ("cov/mean", "cov/kept"):
        assert all(math.isfinite(v) for v in logged(trainer, key)) and logged(trainer, key)
    own = {
        "clip_cov": ["clip_cov/clipped_fraction"],
        "kl_cov": ["kl_cov/penalized_fraction", "kl_cov/penalty"],
        "entropy_adv": ["entropy_adv/shaping", "entropy_adv/capped_fraction"],
    }[method]
    for key in own:
        values = logged(trainer, key)
        assert values and all(math.isfinite(v) and v >= 0 for v in values)
    assert logged(trainer, own[0])[0] > 0  # the method acted
    if method == "kl_cov":  # off-policy from the second micro-batch of each generation batch: a non-zero penalty
        assert max(logged(trainer, "kl_cov/penalty")) > 0
        assert trainer.epsilon_low == 1.0 and trainer.epsilon_high == math.inf  # the reference has no PPO clip


def test_covariance_metric_is_logged_without_a_method(make_trainer):
    trainer = make_trainer(forking_mode="top", forking_ratio=0.3)
    logps_grad(trainer, fixed_batch(trainer))
    metrics = trainer._metrics["train"]
    assert metrics["cov/mean"] and metrics["cov/kept"] and metrics["cov/dropped"]
    assert not any(key.startswith(("clip_cov", "kl_cov", "entropy_adv")) for key in metrics)


@pytest.mark.parametrize(
    "spg, ni, ga, on_policy",
    [(1, 1, 1, True), (1, 2, 2, True), (2, 1, 4, True), (3, 1, 4, False), (2, 1, 1, False), (1, 2, 1, False)],
)
def test_kl_cov_warns_exactly_when_the_run_is_on_policy_and_its_penalty_says_so(
    tiny_model, tmp_path, caplog, spg, ni, ga, on_policy
):
    """Issue 22, finding 5: the rule is gradient_accumulation_steps a multiple of steps_per_generation x
    num_iterations (spg 1, ni 2, GA 2 is on-policy; spg 3, ni 1, GA 4 is not, though the old text called it so). The
    warning states it with the run's numbers; the measured penalty agrees with the verdict."""
    args = trainer_args(
        tmp_path,
        entropy_method="kl_cov",
        kl_cov_ratio=0.5,
        forking_mode="all",
        loss_type="dapo",
        steps_per_generation=spg,
        num_iterations=ni,
        gradient_accumulation_steps=ga,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        max_steps=2,
    )
    assert args.fully_on_policy() is on_policy
    with caplog.at_level("WARNING"):
        trainer = ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    warned = "penalty |log π − log π_old| is 0 in value and gradient" in caplog.text
    assert warned is on_policy
    if warned:
        assert args.on_policy_reason() in caplog.text and f"= {spg} × {ni} = {spg * ni}" in caplog.text
        assert "num_iterations > 1" not in caplog.text and "num_iterations=1," not in caplog.text
    trainer.train()
    penalty = max(logged(trainer, "kl_cov/penalty"))
    assert (penalty == 0) is on_policy, penalty


def test_ratio_schedule_trains_logs_and_resumes_exactly(tiny_model, tmp_path):
    """Issue 22: a linear ρ from 1.0 to 0.25 over 4 steps keeps 1.0, 0.75, 0.5, 0.25 of the tokens (threshold ties may
    add a few), logged as forking/ratio; resumed from checkpoint-2 it goes on with 0.5, 0.25."""
    kwargs = dict(
        forking_mode="top",
        forking_ratio=1.0,
        forking_ratio_schedule="linear",
        forking_ratio_end=0.25,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    whole = ForkingGRPOTrainer(
        tiny_model, length_reward, args=trainer_args(tmp_path, **kwargs), train_dataset=prompt_dataset()
    )
    whole.train()
    assert logged(whole, "forking/ratio") == pytest.approx([1.0, 0.75, 0.5, 0.25])
    kept = logged(whole, "forking/kept_fraction")
    assert all(k >= r - 1e-6 for k, r in zip(kept, [1.0, 0.75, 0.5, 0.25])) and kept[-1] < 0.5
    resumed = ForkingGRPOTrainer(
        tiny_model, length_reward, args=trainer_args(tmp_path, **kwargs), train_dataset=prompt_dataset()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert logged(resumed, "forking/ratio")[-2:] == pytest.approx([0.5, 0.25])
