"""DAPO dynamic sampling: the pure decisions on hand-built tensors, then training in one and in two processes, each
training test with both trainers that carry it: `DynamicSamplingGRPOTrainer` (plain GRPO) and `ForkingGRPOTrainer`."""

import json
import math

import pytest
import torch

from _util import AdvantageSpy, half_constant_reward, logged, prompt_dataset, trainer_args
from forking_trl import DynamicSamplingGRPOConfig, DynamicSamplingGRPOTrainer, ForkingGRPOConfig, ForkingGRPOTrainer
from forking_trl.dynamic_sampling import (
    NORMALIZED_SPREAD_TOLERANCE,
    fill_groups,
    group_rows,
    informative_groups,
    stack_rows,
    take_groups,
    training_rewards,
)
from test_launch import launch

# ---------------------------------------------------------------------------------------------------------------
# the pure functions


def trl_advantages(per_func, weights, G, aggregation):
    """TRL 1.16's advantages for these rewards (GRPOTrainer._generate_and_score_completions, scale_rewards='group')."""
    from trl.trainer.utils import nanstd

    w = torch.tensor(weights)
    if aggregation == "sum_then_normalize":
        rewards = (per_func * w).nansum(dim=1)
        mean = rewards.view(-1, G).nanmean(dim=1).repeat_interleave(G)
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
        return (rewards - mean) / (std + 1e-4)
    grouped = per_func.view(-1, G, per_func.size(1))
    reward_k = (grouped - grouped.nanmean(dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    rewards = (reward_k.view(-1, per_func.size(1)) * w).nansum(dim=1)
    return (rewards - rewards.nanmean()) / (nanstd(rewards) + 1e-4)


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_informative_means_a_non_zero_advantage_for_either_aggregation(aggregation):
    """Issue 15, finding 2: the decision follows what TRL's advantage uses, not the raw weighted sum."""
    G = 4
    groups = [
        ([0, 2, 0, 2], [1, 0, 1, 0], [1.0, 2.0]),  # raw total 2 everywhere, normalised rewards spread
        ([0, 1, 0, 1], [0, 3, 0, 3], [1.0, -1.0]),  # raw totals spread, normalised rewards cancel
        ([1, 1, 1, 1], [0, 0, 0, 0], [1.0, 2.0]),  # constant
    ]
    for f1, f2, weights in groups:
        per_func = torch.tensor([f1, f2], dtype=torch.float32).T  # (G, 2)
        per_func = torch.cat([per_func, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])])  # + a group
        advantages = trl_advantages(per_func, weights, G, aggregation)[:G]
        signal = training_rewards(per_func, torch.tensor(weights), G, aggregation)
        tolerance = NORMALIZED_SPREAD_TOLERANCE if aggregation == "normalize_then_sum" else 0.0
        informative = bool(informative_groups(signal, G, tolerance)[0])
        assert informative == bool(advantages.abs().max() > 1e-3), (f1, f2, weights, aggregation)


def test_informative_groups_ignores_unscorable_and_needs_a_spread():
    nan = float("nan")
    rewards = torch.tensor(
        [
            [1.0, 1.0, 1.0],  # all solved
            [0.0, 0.0, 0.0],  # all failed
            [0.0, 1.0, 0.0],  # informative
            [nan, 1.0, 1.0],  # the scorable ones are equal
            [nan, nan, 1.0],  # one scorable completion: no spread
            [nan, 0.0, 1.0],  # informative despite an unscorable one
            [0.1, 0.1, 0.1 + 1e-6],  # a tiny spread still counts (advantages are scaled by the std)
        ]
    ).flatten()
    assert informative_groups(rewards, 3).tolist() == [False, False, True, False, False, True, True]


def test_take_and_fill_groups():
    informative = torch.tensor([False, True, False, True, True])
    taken = take_groups(informative, 2)
    assert taken.tolist() == [1, 3]
    assert take_groups(informative, 9).tolist() == [1, 3, 4] and take_groups(informative, 0).tolist() == []
    assert fill_groups(informative, taken, 2).tolist() == [0, 2]  # not taken: the uninformative first
    assert group_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_stack_rows_pads_prompts_left_and_completions_right():
    a = {
        "prompt_ids": torch.tensor([[5, 6], [7, 8]]),
        "completion_ids": torch.tensor([[1, 2, 3], [4, 0, 0]]),
        "advantages": torch.tensor([0.5, -0.5]),
        "num_items_in_batch": torch.tensor(4),
    }
    b = {
        "prompt_ids": torch.tensor([[1, 2, 3]]),
        "completion_ids": torch.tensor([[9]]),
        "advantages": torch.tensor([1.0]),
        "num_items_in_batch": torch.tensor(1),
    }
    out = stack_rows(
        [(a, torch.tensor([1])), (b, torch.tensor([0]))],
        left_padded=("prompt_ids",),
        pad_values={"prompt_ids": -1, "completion_ids": -2},
    )
    assert out["prompt_ids"].tolist() == [[-1, 7, 8], [1, 2, 3]]
    assert out["completion_ids"].tolist() == [[4, 0, 0], [9, -2, -2]]
    assert out["advantages"].tolist() == [-0.5, 1.0]
    assert out["num_items_in_batch"].item() == 4  # 0-dim values: the first batch's (the trainer recounts)


# ---------------------------------------------------------------------------------------------------------------
# training, with either trainer

TRAINERS = {
    "plain": (DynamicSamplingGRPOTrainer, DynamicSamplingGRPOConfig),
    "forking": (ForkingGRPOTrainer, ForkingGRPOConfig),
}


@pytest.fixture(params=list(TRAINERS))
def kind(request) -> str:
    return request.param


def ds_args(kind, tmp_path, **overrides):
    """The suite's tiny settings as the config of `kind`'s trainer, dynamic sampling on unless overridden."""
    return trainer_args(tmp_path, config_class=TRAINERS[kind][1], **{"dynamic_sampling": True, **overrides})


def make_trainer(kind, model, reward, args, dataset=None):
    return TRAINERS[kind][0](model, reward, args=args, train_dataset=prompt_dataset() if dataset is None else dataset)


def only_informative(seen) -> None:
    """Every micro-batch trained on holds odd (informative) prompts only, each group with non-zero advantages."""
    assert seen
    by_prompt = {}
    for numbers, advantages in seen:
        assert all(n % 2 == 1 for n in numbers), numbers  # no constant-reward group reached the loss
        for n, a in zip(numbers, advantages):
            by_prompt.setdefault(n, []).append(a)
    assert all(any(abs(a) > 1e-3 for a in advs) for advs in by_prompt.values())


PLAIN_SETTINGS = {
    "plain": dict(),
    "accumulation": dict(steps_per_generation=2, gradient_accumulation_steps=2, per_device_train_batch_size=4),
    "iterations": dict(num_iterations=2),
}
FORKING_SETTINGS = {
    "batch-scope": dict(forking_scope="batch"),
    "batch-scope-reuse": dict(forking_scope="batch", num_iterations=2, loss_type="dapo"),
}
SETTINGS = [
    pytest.param(k, name, overrides, id=f"{k}-{name}")
    for k in TRAINERS
    for name, overrides in {**PLAIN_SETTINGS, **(FORKING_SETTINGS if k == "forking" else {})}.items()
]


@pytest.mark.slow
@pytest.mark.parametrize("kind, name, overrides", SETTINGS)
def test_only_informative_groups_reach_the_loss(tiny_model, tmp_path, kind, name, overrides):
    args = ds_args(kind, tmp_path, max_steps=3, **overrides)
    trainer = make_trainer(kind, tiny_model, half_constant_reward, args)
    spy = AdvantageSpy(trainer)
    trainer.train()
    only_informative(spy.seen)
    rounds = logged(trainer, "dynamic_sampling/rounds")
    kept = logged(trainer, "dynamic_sampling/kept_groups")
    assert rounds and all(r >= 1 for r in rounds)
    assert kept and all(0 < k < 1 for k in kept)  # half the prompts are uninformative
    assert all(f == 0.0 for f in logged(trainer, "dynamic_sampling/filled_groups"))
    if getattr(args, "forking_scope", None) == "batch":
        assert all(abs(k - 0.2) < 0.12 for k in logged(trainer, "forking/kept_fraction"))
    if kind == "plain":  # dynamic sampling alone: none of the forking machinery ran
        assert not any(key.startswith(("forking/", "cov/")) for entry in trainer.state.log_history for key in entry)


@pytest.mark.slow
def test_without_it_uninformative_groups_reach_the_loss(tiny_model, tmp_path, kind):
    # the control for the test above: the spy does see even prompts when dynamic sampling is off
    trainer = make_trainer(kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, dynamic_sampling=False))
    spy = AdvantageSpy(trainer)
    trainer.train()
    assert any(n % 2 == 0 for numbers, _ in spy.seen for n in numbers)
    assert not logged(trainer, "dynamic_sampling/rounds")


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.slow
def test_round_limit_when_every_group_is_uninformative(tiny_model, tmp_path, caplog, kind):
    args = ds_args(kind, tmp_path, dynamic_sampling_max_rounds=3, max_steps=2)
    trainer = make_trainer(kind, tiny_model, constant_reward, args)
    with caplog.at_level("WARNING", logger="forking_trl.dynamic_sampling_trainer"):
        trainer.train()
    assert trainer.state.global_step == 2  # training went on
    assert logged(trainer, "dynamic_sampling/rounds") == [3.0, 3.0]
    assert logged(trainer, "dynamic_sampling/filled_groups") == [1.0, 1.0]
    assert logged(trainer, "dynamic_sampling/kept_groups") == [0.0, 0.0]
    assert caplog.text.count("dynamic_sampling_max_rounds=3") == 1  # said once


@pytest.mark.slow
def test_resume_from_a_checkpoint_with_it_on(tiny_model, tmp_path, kind):
    kwargs = dict(max_steps=2, save_strategy="steps", save_steps=1)
    make_trainer(kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **kwargs)).train()
    resumed = make_trainer(
        kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **{**kwargs, "max_steps": 3})
    )
    spy = AdvantageSpy(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 3
    only_informative(spy.seen)
    assert all(math.isfinite(x) for x in logged(resumed, "dynamic_sampling/kept_groups"))


def test_construction_errors_name_the_fields(tiny_model, tmp_path, kind):
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds"):
        ds_args(kind, tmp_path, dynamic_sampling_max_rounds=0)
    with pytest.raises(ValueError, match="dynamic_sampling_reward must be a reward function's name or None"):
        ds_args(kind, tmp_path, dynamic_sampling_reward=3)
    # with 2 processes and per_device_train_batch_size=6, a group of 4 would span both processes
    args = ds_args(kind, tmp_path, per_device_train_batch_size=8, num_generations=4)
    args.per_device_train_batch_size = 6
    with pytest.raises(ValueError, match=r"6 \* 1 = 6\) must be a multiple of num_generations \(4\)"):
        args._check_dynamic_sampling()
    with pytest.raises(ValueError, match=r"must be a multiple of num_generations"):  # checked again by the trainer
        make_trainer(kind, tiny_model, half_constant_reward, args)


TWO_PROCESS_RUNS = [("plain", "micro_batch"), ("forking", "micro_batch"), ("forking", "batch"), ("plain", "iterable")]


@pytest.mark.slow
def test_two_processes_train_only_on_informative_groups(tiny_model, tmp_path):
    """Each trainer and scope in turn, in one launch of 2 processes (gloo)."""
    from pathlib import Path

    launch(
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        + ["--dynamo_backend", "no"],
        ["--model", tiny_model, "--output_dir", str(tmp_path), "--runs", *(f"{k}:{s}" for k, s in TWO_PROCESS_RUNS)],
        {"ACCELERATE_USE_CPU": "true"},
        script=Path(__file__).resolve().parent / "scripts" / "train_dynamic.py",
    )
    for kind, scope in TWO_PROCESS_RUNS:
        records = [json.loads(p.read_text()) for p in sorted((tmp_path / f"{kind}-{scope}").glob("rank*.json"))]
        assert len(records) == 2 and all(r["world_size"] == 2 and r["steps"] == 3 for r in records), (kind, scope)
        assert all(r["trainer"] == TRAINERS[kind][0].__name__ for r in records)
        for record in records:
            only_informative(record["seen"])
        assert records[0]["seen"] != records[1]["seen"]  # each process trained on its own slice of the groups
        assert records[0]["rounds"] == records[1]["rounds"]  # the same rounds on both: every collective was joined
        assert records[0]["kept_groups"] == records[1]["kept_groups"]


def length_noise(completions, **kwargs):
    return [0.01 * (k % 3) for k in range(len(completions))]  # varies within every group


@pytest.mark.slow
def test_dynamic_sampling_reward_picks_the_function_that_decides(tiny_model, tmp_path, kind):
    # the total reward varies in every group (length_noise), so only the named function can filter
    args = ds_args(kind, tmp_path, dynamic_sampling_reward="half_constant_reward", max_steps=2)
    trainer = make_trainer(kind, tiny_model, [half_constant_reward, length_noise], args)
    spy = AdvantageSpy(trainer)
    trainer.train()
    assert all(n % 2 == 1 for numbers, _ in spy.seen for n in numbers)
    args.dynamic_sampling_reward = "accuracy_reward"
    with pytest.raises(ValueError, match="dynamic_sampling_reward='accuracy_reward' is not one of"):
        make_trainer(kind, tiny_model, [half_constant_reward, length_noise], args)


class DrawSpy:
    """Wraps `trainer._next_dynamic_sampling_batch`: records (global step, prompt texts) of each further batch."""

    def __init__(self, trainer):
        self.trainer, self.inner, self.draws = trainer, trainer._next_dynamic_sampling_batch, []
        trainer._next_dynamic_sampling_batch = self

    def __call__(self):
        batch = self.inner()
        texts = [row["prompt"][-1]["content"] for row in batch]
        self.draws.append((self.trainer.state.global_step, texts))
        return batch


@pytest.mark.slow
def test_resume_continues_the_further_prompt_stream(tiny_model, tmp_path, kind):
    # the further prompts drawn after a resume are those the uninterrupted run drew after the same checkpoint
    kwargs = dict(max_steps=3, save_strategy="steps", save_steps=1)
    whole = make_trainer(kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **kwargs))
    spy = DrawSpy(whole)
    whole.train()
    before = [texts for step, texts in spy.draws if step < 2]
    after = [texts for step, texts in spy.draws if step >= 2]
    assert before and after  # the stream was used on both sides of checkpoint-2, so where it stood matters
    saved = json.loads((tmp_path / "checkpoint-2" / "forking_dynamic_sampling.json").read_text())
    assert saved == {"passes": 0, "drawn": len(before)}

    resumed = make_trainer(kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **kwargs))
    spy = DrawSpy(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [texts for _, texts in spy.draws] == after


def test_resume_inside_a_generation_window_warns_that_the_stream_diverges(tiny_model, tmp_path, caplog, kind):
    """Issue 15, finding 6: with num_iterations 2, checkpoint-1 falls inside a generation window; TRL regenerates on
    resume, so the further prompts cannot follow the uninterrupted run: say so. checkpoint-2 is on a boundary."""
    kwargs = dict(num_iterations=2, max_steps=2, save_strategy="steps", save_steps=1)
    make_trainer(kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **kwargs)).train()
    for checkpoint, inside in (("checkpoint-1", True), ("checkpoint-2", False)):
        resumed = make_trainer(
            kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **{**kwargs, "max_steps": 3})
        )
        caplog.clear()
        with caplog.at_level("WARNING"):
            resumed.train(resume_from_checkpoint=str(tmp_path / checkpoint))
        assert ("inside a generation window" in caplog.text) == inside, checkpoint


def index_reward(completions, **kwargs):
    return [float(k % 4) for k in range(len(completions))]  # a spread in every group of 4: all informative


@pytest.mark.slow
@pytest.mark.parametrize("on", [False, True], ids=["off", "on-all-informative"])
def test_plain_trainer_trains_exactly_as_grpo_trainer_when_nothing_is_dropped(tiny_model, tmp_path, on):
    """`DynamicSamplingGRPOTrainer` adds dynamic sampling and nothing else: off, or on with every group informative
    (one round, all rows taken), its parameters after training are bit-equal to `trl.GRPOTrainer`'s."""
    from trl import GRPOConfig, GRPOTrainer

    from _util import changed, snapshot

    reference = GRPOTrainer(
        tiny_model,
        index_reward,
        args=trainer_args(tmp_path / "trl", config_class=GRPOConfig),
        train_dataset=prompt_dataset(),
    )
    start = snapshot(reference.model)
    reference.train()
    assert changed(start, reference.model)  # training moved the weights, so equality below is not vacuous
    plain = make_trainer("plain", tiny_model, index_reward, ds_args("plain", tmp_path / "ds", dynamic_sampling=on))
    plain.train()
    assert logged(plain, "dynamic_sampling/rounds") == ([1.0, 1.0] if on else [])
    expected, got = snapshot(reference.model), snapshot(plain.model)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_plain_trainer_refuses_the_forking_fields_it_would_ignore(tiny_model, tmp_path):
    """Issue 22, finding 7: DynamicSamplingGRPOTrainer took a ForkingGRPOConfig and trained forking_mode='top',
    entropy_method='kl_cov' as plain GRPO, silently. It refuses them now, naming them; the neutral values pass."""
    args = trainer_args(tmp_path, dynamic_sampling=True, entropy_method="kl_cov")  # a ForkingGRPOConfig (top 20%)
    with pytest.raises(ValueError, match=r"does not implement forking_mode='top', entropy_method='kl_cov'"):
        make_trainer("plain", tiny_model, half_constant_reward, args)
    neutral = trainer_args(tmp_path, dynamic_sampling=True, forking_mode="all")
    trainer = make_trainer("plain", tiny_model, half_constant_reward, neutral)
    assert trainer.args is neutral and trainer.args.dynamic_sampling
    make_trainer("forking", tiny_model, half_constant_reward, args)  # its own trainer takes it


def prompt_stream(n: int = 16):
    from datasets import IterableDataset

    rows = list(prompt_dataset(n))
    return IterableDataset.from_generator(lambda: iter(rows))


@pytest.mark.slow
def test_an_iterable_dataset_streams_the_further_prompts(tiny_model, tmp_path, kind):
    """Issue 22, finding 9: dynamic sampling refused an IterableDataset that GRPOTrainer trains on. The further
    prompts now come from the stream (buffered shuffle of its own, TRL's group layout), and only informative groups
    reach the loss, over more than one pass of the stream."""
    args = ds_args(kind, tmp_path, max_steps=4)
    trainer = make_trainer(kind, tiny_model, half_constant_reward, args, dataset=prompt_stream(8))
    spy, draws = AdvantageSpy(trainer), DrawSpy(trainer)
    trainer.train()
    only_informative(spy.seen)
    assert draws.draws and all(len(texts) == 8 for _, texts in draws.draws)
    for _, texts in draws.draws:  # whole groups: each prompt G = 4 times in a row
        assert all(texts[i] == texts[i - i % 4] for i in range(len(texts)))
    assert trainer._dynamic_passes >= 1  # 8 prompts, 2 per batch: the stream was read past its end and again


@pytest.mark.slow
def test_resume_continues_an_iterable_further_prompt_stream(tiny_model, tmp_path, kind):
    """On resume the stream is read again from its start and the batches drawn before the checkpoint are skipped:
    exact for a reproducible stream (the same source in the same order; the shuffle is seeded)."""
    kwargs = dict(max_steps=3, save_strategy="steps", save_steps=1)
    whole = make_trainer(kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **kwargs), prompt_stream())
    spy = DrawSpy(whole)
    whole.train()
    after = [texts for step, texts in spy.draws if step >= 2]
    assert after and any(step < 2 for step, _ in spy.draws)
    resumed = make_trainer(kind, tiny_model, half_constant_reward, ds_args(kind, tmp_path, **kwargs), prompt_stream())
    spy = DrawSpy(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [texts for _, texts in spy.draws] == after
