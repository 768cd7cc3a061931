"""`BranchingGRPOConfig`: TRL's `GRPOConfig` plus branching rollouts at the forks, for `BranchingGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from .branching import ADVANTAGES as BRANCHING_ADVANTAGES
from .branching import SCORES as BRANCHING_SCORES
from .branching import TREE_WEIGHTINGS as BRANCHING_TREE_WEIGHTINGS
from .config import TREE_ADVANTAGE_LOSSES, GRPOExtensionConfig, choices
from .selection import check_choice


@dataclass
class BranchingGRPOConfig(GRPOExtensionConfig):
    r"""
    Configuration class for the [`BranchingGRPOTrainer`] (and a base of [`ForkingGRPOConfig`]).

    Extends [`~trl.GRPOConfig`] with branching rollouts at the forks, which TRL lacks (its issue #4294 declared tree
    rollouts out of scope): of the `num_generations` = G completions of a prompt, `branching_roots` = M are sampled
    as usual (the roots), and the other G − M are branches, each keeping a root's tokens before a fork position t
    and sampling a new continuation from t. Forks are the roots' highest-scoring positions (entropy or surprisal),
    after TreeRL/EPTree (Hou et al., [arXiv 2506.11902](https://huggingface.co/papers/2506.11902)), FR3E (Li et al.,
    [arXiv 2507.07017](https://huggingface.co/papers/2507.07017)) and CURE (Li et al.,
    [arXiv 2508.11016](https://huggingface.co/papers/2508.11016)). Every completion, root or branch, is an ordinary
    completion of TRL's batch (prefix + continuation). Training only; evaluation samples as TRL does. Every other
    field is TRL's; see [`~trl.GRPOConfig`].

    Parameters:
        > Parameters that control the branching rollouts

        branching (`bool`, *optional*, defaults to `True`):
            (`None` resolves to `True` here, to `False` in [`ForkingGRPOConfig`].) Grow each group as roots and
            branches. `False` trains exactly as [`~trl.GRPOTrainer`] (the control arm).
            Needs `per_device_train_batch_size * steps_per_generation` a multiple of `num_generations` (each process
            grows whole groups).
        branching_roots (`int` or `None`, *optional*, defaults to `None`):
            M, the roots per prompt, in [1, G − 1]; `None`: G // 2 (at least 1).
        branching_per_fork (`int`, *optional*, defaults to `1`):
            Continuations sampled from each fork (TreeRL's T; CURE's 3); G − M must be a multiple of it. The forks of
            a group, (G − M) / `branching_per_fork` of them, are its roots' best-scored allowed positions.
        branching_score (`str`, *optional*, defaults to `"entropy"`):
            What makes a position a fork: `"entropy"`, the entropy of the full next-token distribution at the
            sampling temperature (as the forking selection and CURE), or `"surprisal"`, −log p of the sampled token
            (TreeRL's and FR3E's). Scored in one no-grad forward over the roots.
        branching_min_distance (`int`, *optional*, defaults to `1`):
            Forks of one root are at least this many positions apart (1: distinct positions, as the references).
        branching_answer_marker (`str` or `None`, *optional*, defaults to `None`):
            Text that begins the final answer (e.g. `"\\boxed{"`): a root does not fork after the token where it
            first begins (the decision to start the answer may be taken again). `None`: no such limit. A root never
            forks at its last token or in its padding.
        branching_advantage (`str`, *optional*, defaults to `"group"`):
            Credit for completions that share a prefix. `"group"`: TRL's advantage over the G completions (CURE,
            ARPO). `"tree"`: TreeRL's per-token tree advantage (leave-one-out centred leaf rewards; each segment s
            gets [V(s) − V(parent)] + V(s), V the mean centred value of the leaves below s), replacing TRL's
            advantage (TRL's `scale_rewards` does not apply to it).
        branching_tree_weighting (`str`, *optional*, defaults to `"sqrt"`):
            With `"tree"`: `"sqrt"` divides each node's value by the square root of its number of leaves (TreeRL's
            released script, `--use_weighted_value --weighted_value_style sqrt`); `"none"`: unweighted.
        branching_train_prefix (`bool`, *optional*, defaults to `False`):
            Whether a branch's copied prefix gets policy gradient again. `False`: it is left out of the loss through
            TRL's per-token loss mask (`tool_mask`), so each shared token is trained once, in its root (as CURE,
            which puts the prefix in the prompt). `True`: every completion is trained whole (as TreeRL, which trains
            every root-to-leaf path).

        With `branching=False` every other `branching_*` field is refused unless at its default (it would be
        ignored), and so is `branching_tree_weighting` with `branching_advantage="group"`.
        > The prompt format

        prompt_template (`str` or `None`, *optional*, defaults to `None`):
            How chat prompts reach a model whose tokenizer has no chat template (a base checkpoint): as plain text in
            the template's one `{prompt}`; `None`: the tokenizer's chat template where it has one, else
            `"Question: {prompt}\nAnswer:"`. As in [`DynamicSamplingGRPOConfig`], which documents it in full.
    """

    own_field_prefixes: ClassVar[tuple[str, ...]] = ("branching", "prompt_template")
    switch_defaults: ClassVar[dict[str, bool]] = {"branching": True}

    branching: bool | None = field(
        default=None,
        metadata={
            "help": "Branching rollouts (TreeRL arXiv 2506.11902, FR3E arXiv 2507.07017, CURE arXiv 2508.11016): M "
            "roots per prompt, the other completions branch from their highest-scoring positions. False: TRL's GRPO. "
            "None: the config's default (on in BranchingGRPOConfig, off in ForkingGRPOConfig)."
        },
    )
    branching_roots: int | None = field(
        default=None,
        metadata={"help": "M, roots per prompt, in [1, num_generations - 1]; None: num_generations // 2."},
    )
    branching_per_fork: int = field(
        default=1,
        metadata={"help": "Continuations sampled from each fork; num_generations - M must be a multiple of it."},
    )
    branching_score: str = field(
        default="entropy",
        metadata={
            "help": "Fork score: 'entropy' (full next-token distribution at the sampling temperature, as CURE) or "
            "'surprisal' (-log p of the sampled token, as TreeRL and FR3E).",
            "choices": list(BRANCHING_SCORES),
        },
    )
    branching_min_distance: int = field(
        default=1, metadata={"help": "Forks of one root are at least this many positions apart (1: distinct)."}
    )
    branching_answer_marker: str | None = field(
        default=None,
        metadata={"help": "Text that begins the final answer (e.g. '\\boxed{'): no fork after it. None: no limit."},
    )
    branching_advantage: str = field(
        default="group",
        metadata={
            "help": "Credit: 'group' (TRL's advantage over the G completions, as CURE and ARPO) or 'tree' (TreeRL's "
            "per-token tree advantage).",
            "choices": list(BRANCHING_ADVANTAGES),
        },
    )
    branching_tree_weighting: str = field(
        default="sqrt",
        metadata={
            "help": "With branching_advantage='tree': 'sqrt' (node values / sqrt(leaves), TreeRL's script) or 'none'.",
            "choices": list(BRANCHING_TREE_WEIGHTINGS),
        },
    )
    branching_train_prefix: bool = field(
        default=False,
        metadata={
            "help": "Train a branch's copied prefix again (True, as TreeRL) or leave it out of the loss through "
            "TRL's tool_mask (False: each shared token trained once, in its root, as CURE)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_branching()

    def validate(self) -> None:
        super().validate()
        self._check_branching()

    def fields_that_change_training(self) -> dict:
        return {**super().fields_that_change_training(), **({"branching": True} if self.branching else {})}

    @property
    def num_roots(self) -> int:
        """M: `branching_roots`, or num_generations // 2 (at least 1) when unset."""
        return self.branching_roots if self.branching_roots is not None else max(1, self.num_generations // 2)

    def _check_branching(self) -> None:
        """Validate the branching fields (after TRL derived `steps_per_generation`); `ValueError` naming the field."""

        def count(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < low
                or (high is not None and value > high)
            ):
                span = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be an int {span}; got {value!r}.")

        for name in ("branching", "branching_train_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        check_choice("branching_score", self.branching_score, BRANCHING_SCORES)
        check_choice("branching_advantage", self.branching_advantage, BRANCHING_ADVANTAGES)
        check_choice("branching_tree_weighting", self.branching_tree_weighting, BRANCHING_TREE_WEIGHTINGS)
        count("branching_per_fork", 1)
        count("branching_min_distance", 1)
        marker = self.branching_answer_marker
        if marker is not None and (not isinstance(marker, str) or not marker):
            raise ValueError(f"branching_answer_marker must be a non-empty string or None; got {marker!r}.")
        if not self.branching:
            details = tuple(f.name for f in fields(self) if f.name.startswith("branching_"))
            self._refuse_unused(details, "branching=False", "Set branching=True to grow groups as trees")
            return
        if self.branching_advantage == "group":
            self._refuse_unused(
                ("branching_tree_weighting",),
                "branching_advantage='group' (the weighting is tree credit's)",
                "Set branching_advantage='tree'",
            )
        G = self.num_generations
        if G < 2:
            raise ValueError(f"branching needs num_generations >= 2 (at least one root and one branch); got {G}.")
        if self.branching_roots is not None:
            count("branching_roots", 1, G - 1)
        M = self.num_roots
        if (G - M) % self.branching_per_fork:
            raise ValueError(
                f"branching: the {G - M} branches of a group (num_generations {G} - branching_roots {M}) do not add "
                f"up to whole forks of branching_per_fork={self.branching_per_fork}; choose branching_roots and "
                "branching_per_fork so that num_generations - branching_roots is a multiple of branching_per_fork."
            )
        self._require_whole_groups("branching")
        if self.branching_advantage == "tree" and self.loss_type not in TREE_ADVANTAGE_LOSSES:
            raise ValueError(
                f"branching_advantage='tree' gives per-token advantages, which loss_type={self.loss_type!r} does not "
                f"take per token; use a loss_type among {choices(TREE_ADVANTAGE_LOSSES)}, or "
                "branching_advantage='group'."
            )
