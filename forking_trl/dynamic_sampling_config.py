"""`DynamicSamplingGRPOConfig`: TRL's `GRPOConfig` plus DAPO's dynamic sampling, for `DynamicSamplingGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .config import GRPOExtensionConfig


@dataclass
class DynamicSamplingGRPOConfig(GRPOExtensionConfig):
    r"""
    Configuration class for the [`DynamicSamplingGRPOTrainer`] (and the base of [`ForkingGRPOConfig`]).

    Extends [`~trl.GRPOConfig`] with DAPO's dynamic sampling, which TRL lacks: Yu et al., DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale ([arXiv 2503.14476](https://huggingface.co/papers/2503.14476), Sec. 3.2;
    verl's `filter_groups`). A group (the completions of one prompt) whose rewards are all equal (all solved or all
    failed) has advantage 0 for every completion: no policy gradient, yet it fills the batch and the token-mean
    denominator. Dynamic sampling drops such groups and fills the generation batch with informative groups generated
    from further prompts before training on it. Every other field is TRL's; see [`~trl.GRPOConfig`].

    Parameters:
        > Parameters that control DAPO's dynamic sampling

        dynamic_sampling (`bool`, *optional*, defaults to `True`):
            (`None` resolves to `True` here, to `False` in [`ForkingGRPOConfig`].) Drop the groups whose advantages
            are all 0 (the rewards TRL's advantage is computed from, see
            `multi_objective_aggregation`, are equal across the group) and fill the generation batch with informative
            groups from further prompts: from a map-style `train_dataset` in an order of their own, from a
            `datasets.IterableDataset` as a stream (a buffered shuffle of its own, TRL's group layout). Needs
            `per_device_train_batch_size * steps_per_generation` a multiple of `num_generations` (each process then
            holds whole groups). `False`
            trains exactly as [`~trl.GRPOTrainer`] (the control arm of a comparison).
        dynamic_sampling_max_rounds (`int`, *optional*, defaults to `10`):
            Generation rounds per generation batch at most (DAPO's `max_num_gen_batches`). When the limit is reached
            short of informative groups, the batch is completed with uninformative groups of the last round (advantage
            0: no policy gradient), logged as `dynamic_sampling/filled_groups` and warned about once.
        dynamic_sampling_reward (`str` or `None`, *optional*, defaults to `None`):
            The reward whose spread within a group makes it informative: the name of one reward function (as TRL
            names them, e.g. `"accuracy_reward"`; DAPO's released recipe filters on accuracy, so that the overlong
            shaping alone does not make a group informative), or `None` for what TRL's advantage uses (the weighted
            total reward, or with `multi_objective_aggregation="normalize_then_sum"` the weighted sum of the
            per-function normalised rewards).
        > The prompt format

        prompt_template (`str` or `None`, *optional*, defaults to `None`):
            How chat prompts (`[{"role": "user", "content": ...}]`, what every forking_trl dataset adapter writes)
            reach a model whose tokenizer has no chat template (a base checkpoint): as plain text, the system and user
            contents joined by a blank line in the template's one `{prompt}`. `None`: the tokenizer's chat template
            where it has one, else `"Question: {prompt}\nAnswer:"` (`forking_trl.templates.PLAIN_TEMPLATE`). Set,
            the template is used whatever the tokenizer has. Plain-text prompts are used as they are.
    """

    # the fields this class adds to GRPOConfig: what from_grpo_config accepts and own_fields lists
    own_field_prefixes: ClassVar[tuple[str, ...]] = ("dynamic_sampling", "prompt_template")
    switch_defaults: ClassVar[dict[str, bool]] = {"dynamic_sampling": True}

    dynamic_sampling: bool | None = field(
        default=None,
        metadata={
            "help": "DAPO's dynamic sampling (arXiv 2503.14476): drop groups whose advantages are all 0 and fill the "
            "generation batch with informative groups from further prompts. False: TRL's GRPO as it is. None: "
            "the config's default (on in DynamicSamplingGRPOConfig, off in ForkingGRPOConfig)."
        },
    )
    dynamic_sampling_max_rounds: int = field(
        default=10,
        metadata={
            "help": "Generation rounds per generation batch at most (DAPO's max_num_gen_batches); then the batch is "
            "completed with uninformative groups (advantage 0) and dynamic_sampling/filled_groups says so."
        },
    )
    dynamic_sampling_reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward function (by name, e.g. 'accuracy_reward', as DAPO's recipe) whose spread makes a group "
            "informative; None: what TRL's advantage uses (the weighted total reward)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_dynamic_sampling()

    def validate(self) -> None:
        super().validate()
        self._check_dynamic_sampling()

    def fields_that_change_training(self) -> dict:
        return {
            **super().fields_that_change_training(),
            **({"dynamic_sampling": True} if self.dynamic_sampling else {}),
        }

    def _check_dynamic_sampling(self) -> None:
        """Validate the dynamic-sampling fields (after TRL derived `steps_per_generation`)."""
        if not isinstance(self.dynamic_sampling, bool):
            raise ValueError(f"dynamic_sampling must be True or False; got {self.dynamic_sampling!r}.")
        rounds = self.dynamic_sampling_max_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"dynamic_sampling_max_rounds must be an int >= 1; got {rounds!r}.")
        reward = self.dynamic_sampling_reward
        if reward is not None and (not isinstance(reward, str) or not reward):
            raise ValueError(f"dynamic_sampling_reward must be a reward function's name or None; got {reward!r}.")
        if self.dynamic_sampling:
            self._require_whole_groups("dynamic_sampling")
        else:
            self._refuse_unused(
                ("dynamic_sampling_max_rounds", "dynamic_sampling_reward"),
                "dynamic_sampling=False",
                "Set dynamic_sampling=True to filter groups",
            )
