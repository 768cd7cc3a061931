"""What forking_trl's configs share: `GRPOExtensionConfig` (TRL's `GRPOConfig`, validation that can run again, the
promotion of a plain `GRPOConfig`, the prompt template, the refusal of settings that would be ignored), TRL's loss
types by how they normalise, and what every trainer does with `args` before TRL's `__init__`.

Each config lives beside its trainer, as TRL keeps `grpo_config.py` beside `grpo_trainer.py`:
`dynamic_sampling_config.DynamicSamplingGRPOConfig`, `branching_config.BranchingGRPOConfig`,
`forking_config.ForkingGRPOConfig`. Every field is declared once, by the config that implements it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from trl import GRPOConfig

from .templates import PLAIN_TEMPLATE, check_template

# TRL loss types whose denominator is a token count, and the granularity of that count
SEQUENCE_MEAN_LOSSES = ("grpo", "sapo")  # mean over each sequence's tokens, then over sequences
TOKEN_MEAN_LOSSES = ("bnpo", "dapo", "cispo", "vespo")  # sum over tokens / number of tokens in the (micro-)batch
CONSTANT_NORMALIZER_LOSSES = ("dr_grpo", "luspo")  # divided by a constant: "kept" has no meaning
CLIPPED_SURROGATE_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # -min(r A, clip(r) A), PPO's clip
# loss types whose per-token loss takes a (B, T) advantage token by token (TreeRL's tree credit)
TREE_ADVANTAGE_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")


# when log π_old = log π on every micro-batch: `fully_on_policy`'s condition, TRL's own (pinned in the contract test)
ON_POLICY_RULE = (
    "A run is fully on-policy (every micro-batch is trained with the parameters that generated it, so log π_old = "
    "log π) exactly when gradient_accumulation_steps is a multiple of steps_per_generation × num_iterations: each "
    "generation batch is then used up inside one optimizer step. Otherwise some generation batch straddles an "
    "optimizer step, and its micro-batches after that step are off-policy."
)


def choices(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


@dataclass
class GRPOExtensionConfig(GRPOConfig):
    """What forking_trl's configs share: TRL's `GRPOConfig`, validation that can be run again, promotion of a plain
    `GRPOConfig`, the generation window and on-policy rule. Each subclass adds fields under its `own_field_prefixes`
    and checks them in `validate` (cooperatively: each calls `super().validate()`)."""

    own_field_prefixes: ClassVar[tuple[str, ...]] = ("prompt_template",)
    # a switch declared once, by the class that implements it, with default None: each config says here what None
    # means for it (BranchingGRPOConfig: branching on; ForkingGRPOConfig: off)
    switch_defaults: ClassVar[dict[str, bool]] = {}

    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "How chat prompts reach a tokenizer without a chat template (a base model): a plain template with "
            f"one '{{prompt}}' (None: {PLAIN_TEMPLATE!r}, only where the tokenizer has no chat template). Set, it is "
            "used even where the tokenizer has one."
        },
    )

    def __post_init__(self):
        self._resolve_switches()
        super().__post_init__()
        check_template(self.prompt_template)

    def validate(self) -> None:
        """Check every forking_trl field again (e.g. after one was set on a built config); `ValueError` naming it."""
        self._resolve_switches()
        check_template(self.prompt_template)

    def _resolve_switches(self) -> None:
        for name, default in self.switch_defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, default)

    def _refuse_unused(self, names: tuple[str, ...], why: str, instead: str) -> None:
        """`ValueError` for the first field of `names` set away from its default while `why` makes it unused: the
        config would train without it, silently."""
        defaults = {f.name: f.default for f in fields(self)}
        for name in names:
            value = getattr(self, name)
            if value != defaults[name]:
                raise ValueError(
                    f"{name}={value!r} is set, but {why}, so it would be ignored. {instead}, or leave {name} at its "
                    f"default ({defaults[name]!r})."
                )

    @property
    def generation_window(self) -> int:
        """Micro-batches one generation batch serves in TRL: `steps_per_generation * num_iterations`."""
        return (self.steps_per_generation or 1) * self.num_iterations

    def fully_on_policy(self) -> bool:
        """Every micro-batch is trained on with the parameters that generated it (TRL's condition for skipping its
        old-log-prob pass, vLLM aside; pinned in `tests/test_trl_contract.py`): log π_old is then log π, and KL-Cov's
        penalty is 0. The rule, `ON_POLICY_RULE`: `gradient_accumulation_steps` is a multiple of
        `steps_per_generation * num_iterations`."""
        return self.gradient_accumulation_steps % self.generation_window == 0

    def on_policy_reason(self) -> str:
        """Why this config is or is not fully on-policy, in `ON_POLICY_RULE`'s terms and with its own numbers."""
        ga, spg, ni = self.gradient_accumulation_steps, self.steps_per_generation or 1, self.num_iterations
        verdict = "is" if self.fully_on_policy() else "is not"
        return (
            f"gradient_accumulation_steps={ga} {verdict} a multiple of steps_per_generation × num_iterations = "
            f"{spg} × {ni} = {self.generation_window}"
        )

    def _require_whole_groups(self, feature: str) -> None:
        """`ValueError` unless each process holds whole groups (what dynamic sampling and branching decide on)."""
        local = self.per_device_train_batch_size * (self.steps_per_generation or 1)
        if local % self.num_generations:
            raise ValueError(
                f"{feature} needs each process to hold whole groups: per_device_train_batch_size * "
                f"steps_per_generation ({self.per_device_train_batch_size} * {self.steps_per_generation} = {local}) "
                f"must be a multiple of num_generations ({self.num_generations})."
            )

    def fields_that_change_training(self) -> dict:
        """This config's own fields whose values make training differ from plain GRPO (a trainer that does not
        implement one must refuse it, see `refuse_fields_it_would_ignore`); each class adds its own."""
        return {}

    def own_fields(self) -> dict:
        """The fields this config adds to `GRPOConfig` and their values (`ForkingGRPOTrainer` records them in each
        checkpoint and compares them on resume)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith(self.own_field_prefixes)}

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig, **own_fields):
        """Promote a plain `GRPOConfig` (or a config of a base class) to this class, keeping every value it holds.

        The fields `GRPOConfig.__post_init__` derived (`generation_batch_size`, `steps_per_generation`, ...) are
        copied as they are rather than derived again. This class's own fields take their defaults unless given.
        """
        if isinstance(args, cls):
            return args
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"expected a trl.GRPOConfig, got {type(args).__name__}.")
        promoted = cls.__new__(cls)
        promoted.__dict__.update(args.__dict__)
        for f in fields(cls):
            if f.name.startswith(cls.own_field_prefixes) and f.name not in promoted.__dict__:
                setattr(promoted, f.name, f.default)
        promoted._adopt(args)
        for name, value in own_fields.items():
            if not name.startswith(cls.own_field_prefixes) or not hasattr(promoted, name):
                raise TypeError(f"from_grpo_config() got an unknown field {name!r} for {cls.__name__}.")
            setattr(promoted, name, value)
        promoted.validate()
        return promoted

    def _adopt(self, args: GRPOConfig) -> None:
        """On promotion from `args`: carry over what a TRL field of `args` means in this class (nothing here)."""


def refuse_fields_it_would_ignore(trainer_class: type, args: GRPOExtensionConfig) -> None:
    """`ValueError` when `args` (a config of a richer class, e.g. a `ForkingGRPOConfig` given to
    `DynamicSamplingGRPOTrainer`) sets fields beyond `trainer_class.config_class` that would change training: the
    trainer would silently train without them."""
    own = {f.name for f in fields(trainer_class.config_class)}
    ignored = {k: v for k, v in args.fields_that_change_training().items() if k not in own}
    if ignored:
        shown = ", ".join(f"{k}={v!r}" for k, v in ignored.items())
        raise ValueError(
            f"{trainer_class.__name__} does not implement {shown} of the {type(args).__name__} it was given and "
            "would train without them. Use ForkingGRPOTrainer (it implements every forking_trl field), or turn them "
            "off (forking_mode='all', entropy_method='none', dynamic_sampling=False, branching=False)."
        )


def prepare_trainer_args(trainer_class: type, model, args: GRPOConfig | None) -> GRPOExtensionConfig:
    """What each forking_trl trainer does with `args` before TRL's `__init__`: a default config when None (as TRL:
    output_dir "<model name>-<trainer>", e.g. ForkingGRPO), promotion of a plain `GRPOConfig` to
    `trainer_class.config_class` keeping every value, validation again (fields may have been set after the config
    was built), and the refusal of fields the trainer does not implement."""
    config_class = trainer_class.config_class
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        args = config_class(f"{name.split('/')[-1]}-{config_class.__name__.removesuffix('Config')}")
    args = config_class.from_grpo_config(args)
    args.validate()
    refuse_fields_it_would_ignore(trainer_class, args)
    return args
