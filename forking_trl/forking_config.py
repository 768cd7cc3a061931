"""`ForkingGRPOConfig`, for `ForkingGRPOTrainer`: TRL's `GRPOConfig` plus the forking-token selection (Wang et al.,
arXiv 2506.01939), the entropy methods, and (through its bases) DAPO's dynamic sampling and branching rollouts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from trl import GRPOConfig

from .branching_config import BranchingGRPOConfig
from .config import (
    CLIPPED_SURROGATE_LOSSES,
    CONSTANT_NORMALIZER_LOSSES,
    SEQUENCE_MEAN_LOSSES,
    TOKEN_MEAN_LOSSES,
    choices,
)
from .credit import METHOD_NAMES
from .dynamic_sampling_config import DynamicSamplingGRPOConfig
from .selection import MODES, RATIO_SCHEDULES, SELECTIONS, check_choice, check_selection_args

SCOPES = ("micro_batch", "rank", "sequence", "batch")
NORMALIZERS = ("all", "kept")

# the loss types each entropy method is defined for (others are refused at construction)
METHOD_LOSSES = {
    "clip_cov": CLIPPED_SURROGATE_LOSSES,  # clips among the tokens PPO's clip has not clipped
    "kl_cov": CLIPPED_SURROGATE_LOSSES,  # replaces PPO's clip by its penalty (the reference's surrogate is -r A)
    "entropy_adv": CLIPPED_SURROGATE_LOSSES + ("cispo", "sapo"),  # a positive factor on A: losses linear in A
}
# each entropy method's own parameters (refused when set for another method: they would be ignored)
METHOD_PARAMETERS = {
    "clip_cov": ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"),
    "kl_cov": ("kl_cov_ratio", "kl_cov_coef"),
    "entropy_adv": ("entropy_adv_alpha", "entropy_adv_kappa"),
}
# the fields ForkingGRPOConfig adds to GRPOConfig (dynamic sampling's and branching's among them)
OWN_FIELD_PREFIXES = (
    "prompt_template",
    "forking_",
    "dynamic_sampling",
    "branching",
    "entropy_method",
    "clip_cov_",
    "kl_cov_",
    "entropy_adv_",
)

_COV = "The Entropy Mechanism of RL for Reasoning LMs, arXiv 2505.22617"
_EXPLORE = "Reasoning with Exploration: An Entropy Perspective, arXiv 2506.14758"


@dataclass
class ForkingGRPOConfig(DynamicSamplingGRPOConfig, BranchingGRPOConfig):
    r"""
    Configuration class for the [`ForkingGRPOTrainer`].

    Extends [`~trl.GRPOConfig`] (through [`DynamicSamplingGRPOConfig`]) with the fields that select which completion tokens receive policy gradient, after
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
            ρ, the share of valid completion tokens that receive policy gradient, in `(0, 1]`. The paper uses `0.2`
            throughout; with a `forking_ratio_schedule`, ρ at the first optimizer step.
        forking_ratio_schedule (`str`, *optional*, defaults to `"constant"`):
            ρ over training (an extension: the paper and the frameworks keep it constant). `"constant"`:
            `forking_ratio` throughout. `"linear"` and `"cosine"`: from `forking_ratio` at the first optimizer step
            to `forking_ratio_end` at the last (`max_steps`), with p = step / (max_steps − 1): linear ρ = ρ₀ +
            (ρ₁ − ρ₀)·p, cosine ρ = ρ₁ + (ρ₀ − ρ₁)·(1 + cos πp)/2. E.g. `1.0` → `0.2`: every token while the model
            learns the format, the forks after. Follows the optimizer step, so a resumed run continues it exactly;
            logged as `forking/ratio`. Needs a `forking_mode` other than `"all"`.
        forking_ratio_end (`float` or `None`, *optional*, defaults to `None`):
            ρ at the last optimizer step of a `"linear"` or `"cosine"` schedule, in `(0, 1]`; required by them,
            and unset (`None`) with `"constant"`.
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

        > Parameters that control DAPO's dynamic sampling (see [`DynamicSamplingGRPOConfig`])

        dynamic_sampling (`bool`, *optional*, defaults to `False`):
            DAPO's dynamic sampling ([arXiv 2503.14476](https://huggingface.co/papers/2503.14476)), as in the paper's
            recipe; off by default here (on in [`DynamicSamplingGRPOConfig`], which documents it in full).
        dynamic_sampling_max_rounds (`int`, *optional*, defaults to `10`):
            Generation rounds per generation batch at most, as in [`DynamicSamplingGRPOConfig`].
        dynamic_sampling_reward (`str` or `None`, *optional*, defaults to `None`):
            The reward whose spread makes a group informative, as in [`DynamicSamplingGRPOConfig`].

        > Parameters of the branching rollouts (see [`BranchingGRPOConfig`], which documents them in full)

        branching (`bool`, *optional*, defaults to `False`):
            Branching rollouts at the forks: `branching_roots` roots per prompt, the other completions branch from
            their best-scored positions; off by default here (on in [`BranchingGRPOConfig`]).
        branching_roots (`int` or `None`, *optional*, defaults to `None`):
            M, the roots per prompt, in [1, G − 1]; `None`: G // 2.
        branching_per_fork (`int`, *optional*, defaults to `1`):
            Continuations sampled from each fork; G − M must be a multiple of it.
        branching_score (`str`, *optional*, defaults to `"entropy"`):
            `"entropy"` (as the selection and CURE) or `"surprisal"` (−log p of the sampled token, TreeRL, FR3E).
        branching_min_distance (`int`, *optional*, defaults to `1`):
            Forks of one root are at least this many positions apart.
        branching_answer_marker (`str` or `None`, *optional*, defaults to `None`):
            Text that begins the final answer (e.g. `"\\boxed{"`): no fork after the token where it begins.
        branching_advantage (`str`, *optional*, defaults to `"group"`):
            `"group"` (TRL's advantage over the G completions) or `"tree"` (TreeRL's per-token tree advantage).
        branching_tree_weighting (`str`, *optional*, defaults to `"sqrt"`):
            With `"tree"`: node values divided by sqrt(leaves) (`"sqrt"`, TreeRL's script) or not (`"none"`).
        branching_train_prefix (`bool`, *optional*, defaults to `False`):
            Train a branch's copied prefix again (`True`, TreeRL) or leave it out of the loss (`False`, CURE).

        > Parameters of the entropy methods that followed the paper (one at a time; composable with the selection)

        entropy_method (`str`, *optional*, defaults to `"none"`):
            An entropy method applied to the tokens that receive policy gradient. `"clip_cov"` and `"kl_cov"`: Cui et
            al., The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models
            ([arXiv 2505.22617](https://huggingface.co/papers/2505.22617)), which act on the tokens of largest
            covariance cov_t = (A_t − mean A)(log π_t − mean log π) between log-probability and advantage, the term
            that drives entropy down. `"entropy_adv"`: Cheng et al., Reasoning with Exploration: An Entropy
            Perspective ([arXiv 2506.14758](https://huggingface.co/papers/2506.14758)), A'_t = A_t + min(α·H_t,
            |A_t|/κ). Computed per micro-batch on each process, as the references do; with a `forking_mode` other
            than `"all"`, a method acts only on the kept tokens. Defined for `loss_type` `"grpo"`, `"bnpo"`,
            `"dr_grpo"`, `"dapo"`, `"luspo"` (and `"cispo"`, `"sapo"` for `"entropy_adv"`), token-level importance
            sampling only.
        clip_cov_ratio (`float`, *optional*, defaults to `2e-4`):
            Clip-Cov: the share of the active tokens (at least one per micro-batch) that get no policy gradient,
            drawn at random among those with `clip_cov_lb < cov_t < clip_cov_ub` that PPO's clip has not clipped
            (nor, with TRL's `delta` set, those with ratio above `delta`, whose gradient is already 0).
            In (0, 1]; the authors' default.
        clip_cov_lb (`float`, *optional*, defaults to `1.0`):
            Clip-Cov: lower bound of cov_t for a token to be a candidate (the authors' default).
        clip_cov_ub (`float`, *optional*, defaults to `5.0`):
            Clip-Cov: upper bound of cov_t for a token to be a candidate; greater than `clip_cov_lb` (the authors'
            default).
        kl_cov_ratio (`float`, *optional*, defaults to `2e-3`):
            KL-Cov: the share of the active tokens (at least one per micro-batch) of largest cov_t that get the
            penalty `kl_cov_coef * |log π_t − log π_old,t|` added to their policy loss. In (0, 1]; the paper's
            recipes use 2e-3 at 7B and 2e-4 at 32B. As in the reference, KL-Cov replaces PPO's clip: with it the
            trainer trains on the unclipped surrogate −r·A (`epsilon` and `epsilon_high` are not applied; TRL's
            two-sided clip `delta` is refused). On a fully on-policy run (log π_old = log π: exactly when
            `gradient_accumulation_steps` is a multiple of `steps_per_generation * num_iterations`, as with TRL's
            defaults) the penalty is 0 in value and gradient, and the trainer warns. With
            `forking_normalizer="kept"` the penalty is averaged over the kept tokens, like the policy term.
        kl_cov_coef (`float`, *optional*, defaults to `1.0`):
            KL-Cov: the penalty's coefficient, ≥ 0 (the paper's 1).
        entropy_adv_alpha (`float`, *optional*, defaults to `0.4`):
            Entropy advantage: α, the weight of the detached token entropy in ψ_t = min(α·H_t, |A_t|/κ), ≥ 0 (the
            paper's 0.4).
        entropy_adv_kappa (`float`, *optional*, defaults to `2.0`):
            Entropy advantage: κ, the cap |A_t|/κ on ψ_t, which keeps the shaped advantage's sign; ≥ 1 (the paper's
            2). For κ ≥ 1, A' = f·A with a detached f ≥ 0, applied as a per-token factor on the policy loss.

        A field that the other settings leave unused is refused unless at its default, naming the switch: a
        method's parameters without that `entropy_method`, `forking_ratio` (but 1.0) and `forking_selection`,
        `forking_scope`, `forking_normalizer` with `forking_mode="all"`, `forking_kept_entropy_bonus` without a bonus,
        the `dynamic_sampling_*` and `branching_*` fields with their switch off.

        > The prompt format

        prompt_template (`str` or `None`, *optional*, defaults to `None`):
            How chat prompts reach a model whose tokenizer has no chat template (a base checkpoint): as plain text in
            the template's one `{prompt}`; `None`: the tokenizer's chat template where it has one, else
            `"Question: {prompt}\nAnswer:"`. As in [`DynamicSamplingGRPOConfig`], which documents it in full.
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
    forking_ratio_schedule: str = field(
        default="constant",
        metadata={
            "help": "ρ over training: 'constant' (forking_ratio throughout, the paper), 'linear' or 'cosine' (from "
            "forking_ratio at the first optimizer step to forking_ratio_end at the last); logged as forking/ratio.",
            "choices": list(RATIO_SCHEDULES),
        },
    )
    forking_ratio_end: float | None = field(
        default=None,
        metadata={"help": "ρ at the last optimizer step of a 'linear' or 'cosine' schedule, in (0, 1]."},
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

    entropy_method: str = field(
        default="none",
        metadata={
            "help": f"Entropy method on the tokens that receive policy gradient: 'none', 'clip_cov' or 'kl_cov' "
            f"({_COV}), 'entropy_adv' ({_EXPLORE}). Per micro-batch on each process, as the references.",
            "choices": list(METHOD_NAMES),
        },
    )
    clip_cov_ratio: float = field(
        default=2e-4,
        metadata={"help": f"Clip-Cov ({_COV}): share of active tokens given no gradient, in (0, 1]; authors' 2e-4."},
    )
    clip_cov_lb: float = field(
        default=1.0, metadata={"help": "Clip-Cov: candidates have cov_t > clip_cov_lb (authors' default 1)."}
    )
    clip_cov_ub: float = field(
        default=5.0, metadata={"help": "Clip-Cov: candidates have cov_t < clip_cov_ub (> clip_cov_lb; authors' 5)."}
    )
    kl_cov_ratio: float = field(
        default=2e-3,
        metadata={
            "help": f"KL-Cov ({_COV}): share of active tokens of largest cov_t penalised, in (0, 1]; the paper's "
            "recipes: 2e-3 (7B), 2e-4 (32B). KL-Cov replaces PPO's clip, as the reference."
        },
    )
    kl_cov_coef: float = field(
        default=1.0, metadata={"help": "KL-Cov: coefficient of the penalty |log π − log π_old|, >= 0 (paper: 1)."}
    )
    entropy_adv_alpha: float = field(
        default=0.4,
        metadata={"help": f"Entropy advantage ({_EXPLORE}): α in min(α·H, |A|/κ), >= 0 (paper: 0.4)."},
    )
    entropy_adv_kappa: float = field(
        default=2.0, metadata={"help": "Entropy advantage: κ in min(α·H, |A|/κ), >= 1 (paper: 2)."}
    )

    own_field_prefixes: ClassVar[tuple[str, ...]] = OWN_FIELD_PREFIXES
    switch_defaults: ClassVar[dict[str, bool]] = {"dynamic_sampling": False, "branching": False}

    def __post_init__(self):
        self._check_forking_fields()
        super().__post_init__()  # TRL's, then dynamic sampling's checks
        self._check_entropy_method()

    def validate(self) -> None:
        """Check every forking_trl field again (e.g. after one was set on a built config); `ValueError` naming it."""
        self._check_forking_fields()
        super().validate()
        self._check_entropy_method()

    def _check_forking_fields(self) -> None:
        """Validate the forking fields and their combination with TRL's; `ValueError` naming the field."""
        check_selection_args(self.forking_mode, self.forking_ratio, self.forking_selection, prefix="forking_")
        self._check_ratio_schedule()
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
        if self.forking_mode == "all":
            why = "forking_mode='all' trains every token"
            if self.forking_ratio != 1.0:  # 1.0 says the same as 'all'
                self._refuse_unused(("forking_ratio",), why, "Use forking_mode 'top', 'bottom' or 'random'")
            self._refuse_unused(
                ("forking_selection", "forking_scope", "forking_normalizer"),
                why + " (no threshold is computed)",
                "Use forking_mode 'top', 'bottom' or 'random'",
            )
        if self.forking_kept_entropy_bonus and not entropy_bonus:
            self._refuse_unused(
                ("forking_kept_entropy_bonus",),
                "TRL's entropy bonus is off (entropy_coef=0.0, use_adaptive_entropy=False)",
                "Set entropy_coef or use_adaptive_entropy",
            )
        if self.forking_normalizer == "kept" and self.loss_type in CONSTANT_NORMALIZER_LOSSES:
            raise ValueError(
                f"forking_normalizer='kept' replaces the token count in the loss's denominator, but "
                f"loss_type={self.loss_type!r} divides by a constant. Use forking_normalizer='all', or a loss_type "
                f"among {choices(SEQUENCE_MEAN_LOSSES + TOKEN_MEAN_LOSSES)}."
            )

    def _check_ratio_schedule(self) -> None:
        check_choice("forking_ratio_schedule", self.forking_ratio_schedule, RATIO_SCHEDULES)
        end, schedule = self.forking_ratio_end, self.forking_ratio_schedule
        if schedule == "constant":
            if end is not None:
                raise ValueError(
                    f"forking_ratio_end={end!r} is set, but forking_ratio_schedule='constant' keeps forking_ratio "
                    "throughout: set forking_ratio_schedule to 'linear' or 'cosine', or leave forking_ratio_end unset."
                )
            return
        if isinstance(end, bool) or not isinstance(end, (int, float)) or not (0.0 < end <= 1.0):
            raise ValueError(
                f"forking_ratio_schedule={schedule!r} goes from forking_ratio to forking_ratio_end, which must be a "
                f"float in (0, 1]; got {end!r}."
            )
        if self.forking_mode == "all":
            raise ValueError(
                f"forking_ratio_schedule={schedule!r} with forking_mode='all': every token is trained and the ratio "
                "is not used. Use forking_mode 'top', 'bottom' or 'random' with the schedule."
            )
        self.forking_ratio_end = float(end)

    def _check_entropy_method(self) -> None:
        """Validate the entropy method's fields and its combination with TRL's; `ValueError` naming the field."""
        check_choice("entropy_method", self.entropy_method, METHOD_NAMES)

        def number(name: str, low: float, high: float = math.inf, open_low: bool = False, why: str = "") -> None:
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
            if not (ok and (low < value if open_low else low <= value) and value <= high):
                span = f"in {'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
                raise ValueError(f"{name} must be a number {span}; got {value!r}.{why}")
            setattr(self, name, float(value))

        number("clip_cov_ratio", 0.0, 1.0, open_low=True)
        number("kl_cov_ratio", 0.0, 1.0, open_low=True)
        number("clip_cov_lb", -math.inf)
        number("clip_cov_ub", -math.inf)
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub}): Clip-Cov's "
                "candidates have clip_cov_lb < cov_t < clip_cov_ub (the authors' defaults: 1 and 5)."
            )
        number("kl_cov_coef", 0.0)
        number("entropy_adv_alpha", 0.0)
        why = " Below 1 the cap |A|/κ exceeds |A| and can flip a negative advantage's sign (the paper uses κ = 2)."
        number("entropy_adv_kappa", 1.0, why=why)
        method = self.entropy_method
        for other, parameters in METHOD_PARAMETERS.items():
            if other != method:
                self._refuse_unused(parameters, f"entropy_method={method!r}", f"Set entropy_method={other!r}")
        if method == "none":
            return
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                f"entropy_method={method!r} with TRL's entropy bonus (entropy_coef={self.entropy_coef}, "
                f"use_adaptive_entropy={self.use_adaptive_entropy}): TRL weights the bonus by the same per-token "
                "multiplier as the policy term, so the method would reshape the bonus too. Use one of the two: "
                "entropy_method='none', or entropy_coef=0.0 and use_adaptive_entropy=False."
            )
        if self.loss_type not in METHOD_LOSSES[method]:
            raise ValueError(
                f"entropy_method={method!r} is not defined for loss_type={self.loss_type!r}; use a loss_type among "
                f"{choices(METHOD_LOSSES[method])}, or entropy_method='none'."
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                f"entropy_method={method!r} needs importance_sampling_level='token' (it acts on single tokens; with "
                f"{self.importance_sampling_level!r} every token's ratio depends on its whole sequence)."
            )
        if method == "kl_cov" and self.delta is not None:
            raise ValueError(
                f"entropy_method='kl_cov' trains on the unclipped surrogate -r·A, as its reference (KL-Cov's penalty "
                f"replaces PPO's clip), but delta={self.delta} is TRL's two-sided clip: it would clamp r at delta "
                "all the same. Set delta=None (the default) with kl_cov, or use another entropy_method."
            )

    def fields_that_change_training(self) -> dict:
        """Dynamic sampling and branching when on, `forking_mode` unless `"all"`, `entropy_method` unless `"none"`:
        with all at those values the forking trainer trains as GRPO (its other fields then only qualify them, or
        log)."""
        out = super().fields_that_change_training()
        if self.forking_mode != "all":
            out["forking_mode"] = self.forking_mode
        if self.entropy_method != "none":
            out["entropy_method"] = self.entropy_method
        return out

    def forking_fields(self) -> dict:
        """forking_trl's own fields (`forking_*`, `dynamic_sampling*`, the entropy methods') and their values:
        recorded in checkpoints, compared on resume."""
        return self.own_fields()

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig, **forking_fields) -> ForkingGRPOConfig:
        """Promote a plain `GRPOConfig` (or a `DynamicSamplingGRPOConfig`) to a `ForkingGRPOConfig`, keeping every
        value it holds.

        The fields `GRPOConfig.__post_init__` derived (`generation_batch_size`, `steps_per_generation`, ...) are
        copied as they are rather than derived again. A `top_entropy_quantile` below 1 becomes `forking_ratio` with
        `forking_mode="top"` (TRL's meaning); other forking fields take their defaults unless given.
        """
        return super().from_grpo_config(args, **forking_fields)

    def _adopt(self, args: GRPOConfig) -> None:
        if args.top_entropy_quantile < 1.0:
            if args.top_entropy_quantile <= 0.0:
                raise ValueError(
                    f"top_entropy_quantile={args.top_entropy_quantile} keeps only the single highest-entropy token in "
                    "TRL; forking_ratio must be in (0, 1]. Set top_entropy_quantile in (0, 1]."
                )
            self.forking_mode, self.forking_ratio = "top", float(args.top_entropy_quantile)
            self.top_entropy_quantile = 1.0
