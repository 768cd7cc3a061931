"""Fails loudly when a TRL hook that ForkingGRPOTrainer relies on changes. Read forking_trl/trainer.py's docstring."""

import inspect

import trl
from packaging.version import Version
from trl import GRPOTrainer
from trl.trainer import utils as trl_utils

TESTED = (Version("1.16"), Version("1.17"))


def source(fn) -> str:
    return inspect.getsource(fn)


def test_trl_version_is_in_the_tested_range():
    assert TESTED[0] <= Version(trl.__version__) < TESTED[1], (
        f"forking_trl is tested with trl>={TESTED[0]},<{TESTED[1]}; found {trl.__version__}. Re-check the hooks "
        "below and setup.cfg's pin before widening it."
    )


def test_get_high_entropy_mask_signature():
    params = list(inspect.signature(GRPOTrainer.get_high_entropy_mask).parameters)
    assert params == ["self", "entropies", "mask", "threshold"]


def test_compute_loss_applies_the_hook_to_the_policy_term_only():
    body = source(GRPOTrainer._compute_loss)
    # the hook is called when top_entropy_quantile < 1 with the entropies TRL computed for the micro-batch
    assert "if self.top_entropy_quantile < 1.0:" in body
    assert "self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)" in body
    assert "compute_entropy=True" in body
    # ...multiplied into the policy loss before the KL term is added and before normalization
    mask_at = body.index("per_token_loss = per_token_loss * entropy_mask")
    kl_at = body.index("per_token_loss = per_token_loss + self.beta * per_token_kl")
    assert mask_at < kl_at
    assert body.index("self.get_high_entropy_mask(") < body.index('inputs["advantages"]')


def test_compute_loss_entry_point():
    params = list(inspect.signature(GRPOTrainer.compute_loss).parameters)
    assert params == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    assert "self._compute_loss(model, inputs)" in source(GRPOTrainer.compute_loss)


def test_generation_batch_hooks_for_batch_scope():
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert list(params)[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"]
    assert "compute_entropy" in params and "batch_size" in params
    gen = source(GRPOTrainer._generate_and_score_completions)
    # the old-log-prob pass (reused for entropies) comes before the reference pass, under this condition
    old_at = gen.index("old_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(")
    assert old_at < gen.index("ref_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(")
    assert "if self.args.gradient_accumulation_steps % generate_every != 0 or (" in gen
    assert "self.use_vllm and self.vllm_importance_sampling_correction" in gen
    # the inputs dict carries every tensor through shuffle and split (mask added by forking_trl rides along)
    prep = source(GRPOTrainer._prepare_inputs)
    assert "shuffle_sequence_dict(generation_batch)" in prep
    assert "split_tensor_dict(generation_batch, self.args.steps_per_generation)" in prep


def test_fused_head_returns_entropy_at_the_sampling_temperature():
    init = source(GRPOTrainer.__init__)
    assert 'outputs=("log_probs", "entropy")' in init
    assert "temperature=self.temperature" in init
    assert "self.top_entropy_quantile = args.top_entropy_quantile" in init
    assert "temperature" in inspect.signature(trl_utils.add_fused_lm_head).parameters


def test_log_and_metrics_store():
    assert list(inspect.signature(GRPOTrainer.log).parameters) == ["self", "logs", "start_time"]
    assert "self._metrics[mode].items()" in source(GRPOTrainer.log)


def test_checkpoint_hooks():
    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_rng_state).parameters) == ["self", "output_dir"]
    assert "self._save_rng_state(output_dir)" in source(Trainer._save_checkpoint)
    assert list(inspect.signature(Trainer.train).parameters)[:2] == ["self", "resume_from_checkpoint"]
    assert "get_last_checkpoint(args.output_dir)" in source(Trainer.train)


def test_reward_funcs_is_optional_and_the_entropy_bonus_uses_the_hooks_mask():
    assert inspect.signature(GRPOTrainer.__init__).parameters["reward_funcs"].default is None
    # documented in ForkingGRPOConfig.forking_kept_entropy_bonus: the bonus acts on the tokens the hook keeps
    assert "effective_mask = mask if entropy_mask is None else mask * entropy_mask" in source(
        GRPOTrainer._compute_loss
    )


def test_dynamic_sampling_hooks():
    from transformers import Trainer
    from trl.trainer.grpo_trainer import RepeatSampler

    # the rewards of every process, as dynamic sampling reads them: gathered inside _calculate_rewards
    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters) == [
        "self",
        "inputs",
        "prompts",
        "completions",
        "completion_ids_list",
    ]
    assert "rewards_per_func = gather(rewards_per_func)" in source(GRPOTrainer._calculate_rewards)
    gen = source(GRPOTrainer._generate_and_score_completions)
    assert "rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in gen
    assert "process_slice = slice(" in gen and "self.accelerator.process_index * len(prompts)" in gen
    assert "num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()" in gen
    assert '"num_items_in_batch": num_items_in_batch,' in gen
    # the sampler and dataloader factory that draw further prompts in TRL's group layout
    params = inspect.signature(RepeatSampler.__init__).parameters
    assert {"data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"} <= set(params)
    params = inspect.signature(Trainer._get_dataloader).parameters
    assert {"dataset", "description", "batch_size", "sampler_fn", "is_training"} <= set(params)
    # the generation batch is made, shuffled and split in _prepare_inputs (dynamic sampling happens before)
    prep = source(GRPOTrainer._prepare_inputs)
    assert prep.index("self._generate_and_score_completions(generation_batch)") < prep.index("shuffle_sequence_dict")


def test_dynamic_sampling_mixin_overrides_only_the_hooks_it_names():
    from forking_trl.dynamic_sampling_trainer import DynamicSamplingMixin

    # a TRL method with the name of one of the mixin's own would be overridden silently
    hooks = {"__init__", "_generate_and_score_completions", "_calculate_rewards", "_save_rng_state", "train"}
    own = {
        name
        for name, value in vars(DynamicSamplingMixin).items()
        if callable(value) or isinstance(value, staticmethod)
    }
    assert hooks <= own
    assert not {name for name in own - hooks if hasattr(GRPOTrainer, name)}


def test_end_distributed_uses_accelerates_end_training_and_shadows_nothing():
    from accelerate import Accelerator

    # ForkingGRPOTrainer.end_distributed: trackers finished and the process group destroyed by Accelerate
    assert "self.state.destroy_process_group()" in source(Accelerator.end_training)
    assert not hasattr(GRPOTrainer, "end_distributed")  # a TRL method of that name would be overridden silently


def test_entropy_methods_read_what_compute_loss_reads():
    body = source(GRPOTrainer._compute_loss)
    # the policy's log-probs (captured for the methods) are computed before the hook is called
    assert body.index("self._get_per_token_logps_and_entropies(") < body.index("self.get_high_entropy_mask(")
    # the methods take log pi_old as TRL does: the inputs' old log-probs, else the detached current ones
    assert 'old_per_token_logps = inputs.get("old_per_token_logps")' in body
    assert "old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None" in body
    # KL-Cov opens PPO's clip through these two attributes, read only by the loss and the clip metrics
    assert "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)" in body
    init = source(GRPOTrainer.__init__)
    assert "self.epsilon_low = args.epsilon" in init
    for name, member in inspect.getmembers(GRPOTrainer, inspect.isfunction):
        if name not in ("__init__", "_compute_loss"):
            assert "self.epsilon_low" not in source(member) and "self.epsilon_high" not in source(member), name


def test_two_sided_clip_clamps_the_ratio_as_clip_cov_assumes():
    # Clip-Cov leaves out tokens with r > delta (their gradient is 0) because TRL's clipped surrogate is
    # -min(min(r, delta) A, clip(r) A); KL-Cov refuses delta because TRL applies it whatever epsilon is
    body = source(GRPOTrainer._compute_loss)
    at = body.index("if self.args.delta is not None:")
    assert body.index("coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)") < at
    assert body.index("coef_1 = torch.clamp(coef_1, max=self.args.delta)", at) < body.index("per_token_loss1 = ")
    assert "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)" in body


def test_iterable_datasets_are_streamed_in_the_group_layout_dynamic_sampling_reuses():
    # the further-prompt stream of a datasets.IterableDataset is built as TRL builds its training stream
    params = inspect.signature(trl_utils.repeat_iterable_dataset).parameters
    assert list(params) == ["dataset", "mini_repeat_count", "batch_size", "repeat_count"]
    loader = source(GRPOTrainer.get_train_dataloader)
    assert "dataset = dataset.shuffle(seed=self.args.seed)" in loader and "self.shuffle_dataset" in loader
    assert "dataset = repeat_iterable_dataset(" in loader


def test_kl_cov_term_is_normalised_exactly_as_trl_normalises_the_loss(tiny_model, tmp_path):
    """For each loss type KL-Cov supports: TRL's loss of a per-token loss that is -c on every token (on-policy, beta 0,
    advantage c) equals forking_trl's `_aggregate_like_trl` of -c, in training (with accumulation) and in eval."""
    import torch

    from _util import length_reward, prompt_dataset, trainer_args
    from forking_trl import ForkingGRPOTrainer
    from forking_trl.config import CLIPPED_SURROGATE_LOSSES

    args = trainer_args(tmp_path, forking_mode="all", gradient_accumulation_steps=2, steps_per_generation=4)
    trainer = ForkingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset())
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    inputs = {
        "prompt_ids": torch.randint(10, 200, (3, 4), generator=g),
        "prompt_mask": torch.ones(3, 4, dtype=torch.long),
        "completion_ids": torch.randint(10, 200, (3, 6), generator=g),
        "completion_mask": mask,
        "advantages": torch.full((3,), 0.75),
        "num_items_in_batch": torch.tensor(37.0),  # the generation batch's count (several micro-batches)
    }
    for loss_type in CLIPPED_SURROGATE_LOSSES:
        trainer.loss_type = loss_type
        for training in (True, False):
            trainer.model.train(training)
            trainer.current_gradient_accumulation_steps = 2
            with torch.no_grad():
                trl_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
                ours = trainer._aggregate_like_trl(torch.full(mask.shape, -0.75), mask, inputs)
            torch.testing.assert_close(ours, trl_loss, msg=f"{loss_type}, training={training}")


def test_branching_hooks():
    from trl.generation.vllm_generation import VLLMGeneration

    # every backend passes through _generate_single_turn(prompt_ids, ...) -> (completion_ids, logprobs)
    params = list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)
    assert params == ["self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"]
    single = source(GRPOTrainer._generate_single_turn)
    assert "self.vllm_generation.generate(" in single and "num_generations=num_generations" in single
    assert "generation_config=self.generation_config" in single and "return completion_ids, logprobs" in single
    # the length limit of a call: vLLM reads its own attribute, transformers the generation config
    assert "max_completion_length = self.max_completion_length" in source(VLLMGeneration.generate)
    assert '"max_new_tokens": self.max_completion_length' in source(GRPOTrainer.__init__)
    # _generate calls it once (no tools) and returns TRL's per-token loss mask third
    gen = source(GRPOTrainer._generate)
    assert "completion_ids, logprobs = self._generate_single_turn(" in gen
    assert (
        "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images" in gen
    )
    score = source(GRPOTrainer._generate_and_score_completions)
    assert "tool_mask_list,\n            completions," in score and ") = self._generate(prompts)" in score
    assert "loss_mask = completion_mask if tool_mask is None else completion_mask * tool_mask" in score
    assert 'output["tool_mask"] = tool_mask' in score
    # (B, T) advantages from a subclass are taken as they are; the loss mask includes the tool mask
    loss = source(GRPOTrainer._compute_loss)
    assert "if advantages.dim() == 1:\n            advantages = advantages.unsqueeze(1)" in loss
    assert 'mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]' in loss


def test_branching_mixin_overrides_only_the_hooks_it_names():
    from forking_trl.branching_trainer import BranchingMixin
    from forking_trl.extension import TrainerExtension

    hooks = {"__init__", "_generate_single_turn", "_generate", "_calculate_rewards", "_generate_and_score_completions"}
    extension = {"__init__", "_generate_single_turn"}  # _check_before_trl: our own
    for cls, named in ((BranchingMixin, hooks), (TrainerExtension, extension)):
        own = {name for name, value in vars(cls).items() if callable(value) or isinstance(value, staticmethod)}
        assert named <= own
        assert not {name for name in own - named if hasattr(GRPOTrainer, name)}, cls


def test_trl_asks_for_router_logits_itself_where_it_trains_with_them():
    # router_logits_off turns the config's flag off during generation; the training forward must not depend on it
    body = source(GRPOTrainer._get_per_token_logps_and_entropies)
    assert 'if compute_aux_loss:\n                model_inputs["output_router_logits"] = True' in body
    assert "compute_aux_loss=self.aux_loss_enabled" in source(GRPOTrainer._compute_loss)
