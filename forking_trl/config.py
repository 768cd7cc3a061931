"""`ForkingGRPOConfig`: TRL's `GRPOConfig` plus the forking-token fields, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from trl import GRPOConfig

from .selection import MODES, SELECTIONS, check_choice, check_selection_args

SCOPES = ("micro_batch", "rank", "sequence", "batch")
NORMALIZERS = ("all", "kept")

# TRL loss types whose denominator is a token count, and the granularity of that count
SEQUENCE_MEAN_LOSSES = ("grpo", "sapo")  # mean over each sequence's tokens, then over sequences
TOKEN_MEAN_LOSSES = ("bnpo", "dapo", "cispo", "vespo")  # sum over tokens / number of tokens in the (micro-)batch
CONSTANT_NORMALIZER_LOSSES = ("dr_grpo", "luspo")  # divided by a constant: "kept" has no meaning

OWN_FIELD_PREFIXES = ("forking_", "dynamic_sampling")

_PAPER = "[Beyond the 80/20 Rule](https://huggingface.co/papers/2506.01939)"


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


@dataclass
class ForkingGRPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`ForkingGRPOTrainer`].

    Extends [`~trl.GRPOConfig`] with the fields that select which completion tokens receive policy gradient, after
    Wang et al., Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM
    Reasoning ([arXiv 2506.01939](https://huggingface.co/papers/2506.01939)). Tokens that are not selected keep their
    KL term and their place in the completion mask; only their policy-gradient term is zeroed, as if their advantage
    were 0. Every other field is TRL's; see [`~trl.GRPOConfig`].

    Parameters:
        > Parameters that control the forking-token selection

        forking_mode (`str`, *optional*, defaults to `"top"`):
            Which tokens receive policy gradient. `"top"`: the `forking_ratio` share of valid completion tokens with
            the highest entropy (the paper's method, top 20%). `"bottom"`: the `forking_ratio` share with the lowest
            entropy, exactly the tokens that `"top"` with `1 - forking_ratio` drops (the paper's bottom-80% ablation
            is `"bottom"` with `0.8`). `"random"`: a uniformly random share of the size `"top"` keeps (the control
            that separates entropy from sparsity). `"all"`: every token (ratio ignored), with the same metrics.
        forking_ratio (`float`, *optional*, defaults to `0.2`):
            ρ, the share of valid completion tokens that receive policy gradient, in `(0, 1]`. The paper uses `0.2`.
        forking_scope (`str`, *optional*, defaults to `"micro_batch"`):
            The set of tokens the threshold is computed over. `"micro_batch"`: the current micro-batch on all
            processes (as TRL's `top_entropy_quantile`). `"rank"`: this process's micro-batch only (as the authors'
            released code). `"sequence"`: each completion on its own. `"batch"`: the whole generation batch on all
            processes, the paper's τ^B; entropies are then computed once per generation batch, before it is split
            into micro-batches (reusing TRL's old-log-prob pass when it makes one, else one extra no-grad forward).
        forking_selection (`str`, *optional*, defaults to `"threshold"`):
            `"threshold"`: keep every token with entropy ≥ τ, τ the ⌈ρn⌉-th largest (ties at τ are all kept, as in
            the paper's 1[H ≥ τ]). `"exact"`: keep exactly ⌈ρn⌉ tokens, ties at τ broken by position (earlier first;
            across processes, lower rank first), as the released code's top-k.
        forking_normalizer (`str`, *optional*, defaults to `"all"`):
            The token count the policy-gradient term is averaged over. `"all"`: every valid completion token, the
            paper's formula and TRL's. `"kept"`: only the kept tokens, as the released code; implemented by scaling
            the kept tokens' policy term by valid/kept, counted per sequence for sequence-mean losses (`"grpo"`,
            `"sapo"`) and over the selection's scope for token-mean losses (`"bnpo"`, `"dapo"`, `"cispo"`,
            `"vespo"`). Not defined for `"dr_grpo"` and `"luspo"`, which divide by a constant.
        forking_log_top_tokens (`int`, *optional*, defaults to `10`):
            At each logging step, print the this many most frequent kept tokens of the logging window (decoded), and
            log them as a table with `report_to="wandb"`. Counting token ids only, no extra forward. `0` disables it.
        forking_kept_entropy_bonus (`bool`, *optional*, defaults to `False`):
            Accept that TRL's entropy bonus (`entropy_coef`, `use_adaptive_entropy`) acts on the kept tokens only.
            TRL applies the bonus, and the adaptive controller measures the entropy, over the same tokens as the
            policy gradient; with any `forking_mode` but `"all"` those are the selected tokens (with `"bottom"`, the
            bonus raises the entropy of the low-entropy tokens alone, and the adaptive `entropy_target` is compared
            with the kept tokens' entropy, not all tokens'). Required, as an explicit choice, to combine the bonus with
            a forking mode other than `"all"`; the paper trains without a bonus.

        > Parameters that control DAPO's dynamic sampling

        dynamic_sampling (`bool`, *optional*, defaults to `False`):
            DAPO's dynamic sampling ([arXiv 2503.14476](https://huggingface.co/papers/2503.14476), Sec. 3.2), which the
            paper's recipe uses and TRL lacks: drop the groups whose total rewards are all equal (all solved or all
            failed: advantage 0, no policy gradient, yet they fill the batch and the token-mean denominator) and fill
            the generation batch with informative groups generated from further prompts before training on it.
            Needs a map-style `train_dataset` and `per_device_train_batch_size * steps_per_generation` a multiple of
            `num_generations` (each process then holds whole groups).
        dynamic_sampling_max_rounds (`int`, *optional*, defaults to `10`):
            Generation rounds per generation batch at most (DAPO's `max_num_gen_batches`). When the limit is reached
            short of informative groups, the batch is completed with uninformative groups of the last round (advantage
            0: no policy gradient), logged as `dynamic_sampling/filled_groups` and warned about once.
        dynamic_sampling_reward (`str` or `None`, *optional*, defaults to `None`):
            The reward whose spread within a group makes it informative: the name of one reward function (as TRL
            names them, e.g. `"accuracy_reward"`; DAPO's released recipe filters on accuracy, so that the overlong
            shaping alone does not make a group informative), or `None` for the total weighted reward.
    """

    forking_mode: str = field(
        default="top",
        metadata={
            "help": "Which tokens receive policy gradient (Beyond the 80/20 Rule, arXiv 2506.01939): 'top' (highest "
            "entropy share, the paper's method), 'bottom' (lowest entropy share: the complement of 'top' with "
            "1 - forking_ratio), 'random' (a random share of the same size, the sparsity control) or 'all'.",
            "choices": list(MODES),
        },
    )
    forking_ratio: float = field(
        default=0.2,
        metadata={"help": "ρ: share of valid completion tokens that receive policy gradient, in (0, 1]. Paper: 0.2."},
    )
    forking_scope: str = field(
        default="micro_batch",
        metadata={
            "help": "Tokens the threshold is computed over: 'micro_batch' (current micro-batch on all processes, as "
            "TRL), 'rank' (this process only, as the released code), 'sequence' (each completion alone) or 'batch' "
            "(whole generation batch on all processes: the paper's τ^B).",
            "choices": list(SCOPES),
        },
    )
    forking_selection: str = field(
        default="threshold",
        metadata={
            "help": "'threshold': keep entropy ≥ τ (τ the ⌈ρn⌉-th largest, ties kept); 'exact': exactly ⌈ρn⌉ tokens, "
            "ties broken by position.",
            "choices": list(SELECTIONS),
        },
    )
    forking_normalizer: str = field(
        default="all",
        metadata={
            "help": "Token count the policy term is averaged over: 'all' valid tokens (the paper's formula, TRL's) or "
            "'kept' tokens only (the released code). 'kept' is not defined for loss_type 'dr_grpo' or 'luspo'.",
            "choices": list(NORMALIZERS),
        },
    )
    forking_log_top_tokens: int = field(
        default=10,
        metadata={"help": "Most frequent kept tokens printed (and logged to wandb) at each logging step; 0: off."},
    )

    forking_kept_entropy_bonus: bool = field(
        default=False,
        metadata={
            "help": "Accept that TRL's entropy bonus (entropy_coef, use_adaptive_entropy) acts on the kept tokens "
            "only (and the adaptive controller measures their entropy). Required to combine the bonus with a "
            "forking_mode other than 'all'."
        },
    )

    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO's dynamic sampling (arXiv 2503.14476), as in the paper's recipe: drop groups whose rewards "
            "are all equal and fill the generation batch with informative groups from further prompts."
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
            "informative; None: the total weighted reward."
        },
    )

    def __post_init__(self):
        self._check_forking_fields()
        super().__post_init__()
        self._check_dynamic_sampling()

    def validate(self) -> None:
        """Check every forking_trl field again (e.g. after one was set on a built config); `ValueError` naming it."""
        self._check_forking_fields()
        self._check_dynamic_sampling()

    def _check_dynamic_sampling(self) -> None:
        """Validate the dynamic-sampling fields (after TRL derived `steps_per_generation`)."""
        if not isinstance(self.dynamic_sampling, bool):
            raise ValueError(f"dynamic_sampling must be True or False; got {self.dynamic_sampling!r}.")
        rounds = self.dynamic_sampling_max_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"dynamic_sampling_max_rounds must be an int >= 1; got {rounds!r}.")
        local = self.per_device_train_batch_size * (self.steps_per_generation or 1)
        if self.dynamic_sampling and local % self.num_generations:
            raise ValueError(
                f"dynamic_sampling needs each process to hold whole groups: per_device_train_batch_size * "
                f"steps_per_generation ({self.per_device_train_batch_size} * {self.steps_per_generation} = {local}) "
                f"must be a multiple of num_generations ({self.num_generations})."
            )

    def _check_forking_fields(self) -> None:
        """Validate the forking fields and their combination with TRL's; `ValueError` naming the field."""
        check_selection_args(self.forking_mode, self.forking_ratio, self.forking_selection, prefix="forking_")
        check_choice("forking_scope", self.forking_scope, SCOPES)
        check_choice("forking_normalizer", self.forking_normalizer, NORMALIZERS)
        self.forking_ratio = float(self.forking_ratio)
        if (
            isinstance(self.forking_log_top_tokens, bool)
            or not isinstance(self.forking_log_top_tokens, int)
            or (self.forking_log_top_tokens < 0)
        ):
            raise ValueError(f"forking_log_top_tokens must be an int >= 0; got {self.forking_log_top_tokens!r}.")
        if self.top_entropy_quantile != 1.0:
            raise ValueError(
                f"top_entropy_quantile={self.top_entropy_quantile} is TRL's own entropy mask; on ForkingGRPOConfig "
                f"use forking_ratio={self.top_entropy_quantile} (with forking_mode='top') instead and leave "
                "top_entropy_quantile at 1.0."
            )
        if self.forking_mode != "all" and self.importance_sampling_level == "sequence":
            raise ValueError(
                f"forking_mode={self.forking_mode!r} needs importance_sampling_level='token': with 'sequence' (GSPO) "
                "the importance ratio of every token depends on all the tokens of its sequence, so zeroing a "
                "token's loss does not remove its gradient. Use importance_sampling_level='token' or "
                "forking_mode='all'."
            )
        if not isinstance(self.forking_kept_entropy_bonus, bool):
            raise ValueError(
                f"forking_kept_entropy_bonus must be True or False; got {self.forking_kept_entropy_bonus!r}."
            )
        entropy_bonus = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        if entropy_bonus and self.forking_mode != "all" and not self.forking_kept_entropy_bonus:
            raise ValueError(
                f"entropy_coef={self.entropy_coef}, use_adaptive_entropy={self.use_adaptive_entropy}: TRL applies its "
                f"entropy bonus to the same tokens as the policy gradient, so with forking_mode={self.forking_mode!r} "
                "it acts on the kept tokens only (with 'bottom': raising the entropy of the low-entropy tokens "
                "alone), and the adaptive controller measures the kept tokens' entropy. Set "
                "forking_kept_entropy_bonus=True (a ForkingGRPOConfig field) to train so, or turn the bonus off "
                "(entropy_coef=0.0, use_adaptive_entropy=False; the paper uses none)."
            )
        if self.forking_normalizer == "kept" and self.loss_type in CONSTANT_NORMALIZER_LOSSES:
            raise ValueError(
                f"forking_normalizer='kept' replaces the token count in the loss's denominator, but "
                f"loss_type={self.loss_type!r} divides by a constant. Use forking_normalizer='all', or a loss_type "
                f"among {_choices(SEQUENCE_MEAN_LOSSES + TOKEN_MEAN_LOSSES)}."
            )

    def forking_fields(self) -> dict:
        """forking_trl's own fields (`forking_*`, `dynamic_sampling*`) and their values: recorded in checkpoints,
        compared on resume."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith(OWN_FIELD_PREFIXES)}

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig, **forking_fields) -> ForkingGRPOConfig:
        """Promote a plain `GRPOConfig` to a `ForkingGRPOConfig`, keeping every value it holds.

        The fields `GRPOConfig.__post_init__` derived (`generation_batch_size`, `steps_per_generation`, ...) are
        copied as they are rather than derived again. A `top_entropy_quantile` below 1 becomes `forking_ratio` with
        `forking_mode="top"` (TRL's meaning); other forking fields take their defaults unless given.
        """
        if isinstance(args, cls):
            return args
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"expected a trl.GRPOConfig, got {type(args).__name__}.")
        promoted = cls.__new__(cls)
        promoted.__dict__.update(args.__dict__)
        for f in fields(cls):
            if f.name.startswith(OWN_FIELD_PREFIXES) and f.name not in promoted.__dict__:
                setattr(promoted, f.name, f.default)
        if args.top_entropy_quantile < 1.0:
            if args.top_entropy_quantile <= 0.0:
                raise ValueError(
                    f"top_entropy_quantile={args.top_entropy_quantile} keeps only the single highest-entropy token in "
                    "TRL; forking_ratio must be in (0, 1]. Set top_entropy_quantile in (0, 1]."
                )
            promoted.forking_mode, promoted.forking_ratio = "top", float(args.top_entropy_quantile)
            promoted.top_entropy_quantile = 1.0
        for name, value in forking_fields.items():
            if not name.startswith(OWN_FIELD_PREFIXES) or not hasattr(promoted, name):
                raise TypeError(f"from_grpo_config() got an unknown forking field {name!r}.")
            setattr(promoted, name, value)
        promoted.validate()
        return promoted
