"""Branching rollouts at the forks: the pure decisions (where to fork, how to credit a tree). No TRL here.

A group (the `G` completions of one prompt) is grown as `M` roots, sampled as usual, and `G - M` branches: a branch
keeps a root's tokens before a fork position `t` and samples a new continuation from `t` (the decision at `t` is
taken again). The methods this follows: TreeRL/EPTree (arXiv 2506.11902; top forks of each chain by -log p of the
sampled token, tree advantages), FR3E (arXiv 2507.07017; the lowest-probability positions as states), CURE (arXiv
2508.11016; high-entropy tokens of each response, re-generations from there, one GRPO group over all).

- `allowed_positions`: where a root may fork: valid tokens, not its last one, not after its final answer began.
- `select_forks`: the fork positions of one group: the best-scored allowed positions over all its roots, at least
  `min_distance` apart within a root; position 0 (a fresh sample from the prompt) when too few are allowed.
- `GroupTree` and `tree_advantages`: TreeRL's credit for the leaves of one group, per token.

Everything is lists and small tensors per group: linear in the tokens, plus a sort of a group's candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCORES = ("entropy", "surprisal")  # full-distribution entropy at t (as the selection), or -log p of the sampled token
ADVANTAGES = ("group", "tree")  # TRL's group advantage over the G leaves (CURE, ARPO), or TreeRL's tree advantage
TREE_WEIGHTINGS = ("none", "sqrt")  # TreeRL's optional 1/sqrt(leaves) weighting of the node values


@dataclass(frozen=True)
class Fork:
    """A fork of one group: root `root` (0..M-1 within the group) at completion position `position`."""

    root: int
    position: int


def allowed_positions(lengths: list[int], answer_starts: list[int | None], width: int) -> torch.Tensor:
    """`(R, width)` bool: the positions a root may fork at.

    A fork at `t` keeps the root's tokens `0..t-1` and samples anew from `t`. Allowed: `1 <= t < length - 1` (a
    valid token that is not the root's last; not 0, where a branch would share nothing with its root, as CURE skips
    it) and, when the root's final answer begins at token `a` (`answer_starts`, None if it has none), `t <= a` (the
    decision to start the answer may be taken again; nothing inside the answer).
    """
    if len(lengths) != len(answer_starts):
        raise ValueError(f"lengths and answer_starts differ in length: {len(lengths)} and {len(answer_starts)}.")
    t = torch.arange(width)
    length = torch.tensor(lengths, dtype=torch.long).unsqueeze(1)
    limit = torch.tensor([width if a is None else a for a in answer_starts], dtype=torch.long).unsqueeze(1)
    return (t >= 1) & (t < length - 1) & (t <= limit)


def select_forks(scores: torch.Tensor, allowed: torch.Tensor, num_forks: int, min_distance: int = 1) -> list[Fork]:
    """The `num_forks` forks of one group, best score first.

    Args:
        scores: `(M, T)` the roots' per-position scores (higher: more of a fork); NaN never chosen.
        allowed: `(M, T)` bool, from `allowed_positions`.
        num_forks: how many forks the group's branches need.
        min_distance: forks of one root are at least this many positions apart (1: distinct positions).

    Returns:
        `num_forks` forks in selection order. Candidates are taken by score, ties by earlier position then lower
        root; a candidate closer than `min_distance` to a fork already taken on its root is skipped. When fewer
        candidates qualify than are needed, the rest are forks at position 0 of the roots in turn (fresh samples from
        the prompt, which share no token with their root).
    """
    if scores.shape != allowed.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and allowed must both be (M, T); got {tuple(scores.shape)} and {tuple(allowed.shape)}."
        )
    if min_distance < 1:
        raise ValueError(f"min_distance must be >= 1; got {min_distance}.")
    num_roots = scores.size(0)
    candidates = allowed & ~torch.isnan(scores)
    roots, positions = candidates.nonzero(as_tuple=True)  # (n,) each
    values = scores[roots, positions].double().cpu().numpy()
    roots, positions = roots.cpu().numpy(), positions.cpu().numpy()
    order = np.lexsort((roots, positions, -values))  # score descending, then earlier position, then lower root
    taken: list[Fork] = []
    per_root: list[list[int]] = [[] for _ in range(num_roots)]
    for i in order:
        if len(taken) == num_forks:
            break
        root, position = int(roots[i]), int(positions[i])
        if all(abs(position - p) >= min_distance for p in per_root[root]):
            taken.append(Fork(root, position))
            per_root[root].append(position)
    fresh = 0
    while len(taken) < num_forks:  # too few allowed positions: fresh samples from the prompt, roots in turn
        taken.append(Fork(fresh % num_roots, 0))
        fresh += 1
    return taken


def answer_start(pieces: list[str], marker: str | None) -> int | None:
    """The index of the token where `marker` first begins in the concatenation of `pieces` (each token's text), or
    None (no marker, or not found). Linear in the text."""
    if not marker:
        return None
    at = "".join(pieces).find(marker)
    if at < 0:
        return None
    end = 0
    for index, piece in enumerate(pieces):
        end += len(piece)
        if end > at:
            return index
    return None


@dataclass(frozen=True)
class GroupTree:
    """The shape of one group: rows `0..M-1` are roots; row `i >= M` is a branch of root `parent[i]` at position
    `fork[i]` (0: a fresh sample, attached to no root). `lengths[i]`: row `i`'s completion length (its prefix
    included). Roots have `parent[i] = i` and `fork[i] = 0`."""

    num_roots: int
    parent: tuple[int, ...]
    fork: tuple[int, ...]
    lengths: tuple[int, ...]

    def __post_init__(self):
        G = len(self.parent)
        if not (len(self.fork) == len(self.lengths) == G and 1 <= self.num_roots <= G):
            raise ValueError("GroupTree: parent, fork and lengths must have one entry per row, with 1 <= M <= G.")
        for i in range(self.num_roots):
            if self.parent[i] != i or self.fork[i] != 0:
                raise ValueError(f"GroupTree: row {i} is a root: parent {i}, fork 0.")
        for i in range(self.num_roots, G):
            inside = self.fork[i] == 0 or 0 < self.fork[i] < self.lengths[self.parent[i]]  # 0: a fresh sample
            if not 0 <= self.parent[i] < self.num_roots or not inside:
                raise ValueError(f"GroupTree: branch {i} must fork from a root, inside it; got {self.parent[i]}.")

    def branches_of(self, root: int) -> list[int]:
        """The branches attached to `root` (fork position > 0)."""
        return [i for i in range(self.num_roots, len(self.parent)) if self.parent[i] == root and self.fork[i] > 0]

    def shared_prefix(self, row: int) -> int:
        """How many leading tokens of `row` are a copy of its root's (0 for roots and fresh samples)."""
        return self.fork[row] if row >= self.num_roots else 0


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """`(G,)` r_i - mean_{j != i} r_j over the scored leaves, TreeRL's centring of the leaf rewards
    (`leaf_normalize`); needs G >= 2. An unscored leaf (reward NaN: every reward function returned None) is left out
    of the others' means and gets NaN; with fewer than two scored leaves there is nothing to centre against and every
    scored leaf gets 0 (as TRL's group advantage gives a lone scored completion 0)."""
    G = rewards.numel()
    if G < 2:
        raise ValueError("leave-one-out centring needs at least 2 leaves.")
    rewards = rewards.double()
    scored = ~torch.isnan(rewards)
    n = int(scored.sum())
    if n < 2:
        return torch.where(scored, 0.0, torch.nan).double()
    total = rewards[scored].sum()
    return torch.where(scored, rewards - (total - rewards) / (n - 1), torch.nan)


def tree_advantages(rewards: torch.Tensor, tree: GroupTree, width: int, weighting: str = "sqrt") -> torch.Tensor:
    """`(G, width)` float32 per-token advantages of one group's leaves by TreeRL's rule (its `tree_node.py` and
    `parallel_mcts.py::gather_paths` with `use_state_value_reward`).

    Leaf values c = leave-one-out centred rewards. A node's value V(s) is the mean of c over the leaves below it
    (V of the group's root, above all roots, is their mean: 0). With `weighting="sqrt"` (TreeRL's
    `use_weighted_value`, style "sqrt") every node's V is divided by sqrt(its number of leaves), the parent's too.
    Each segment s gets [V(s) - V(parent(s))] + V(s) on its tokens. A root with forks at p_1 < ... < p_k is the
    chain of segments [0, p_1), [p_1, p_2), ..., [p_k, end); the segment ending at p_j is the parent of the branches
    forked at p_j. A branch's copied prefix gets its root's segment values (trained only with
    `branching_train_prefix`). Padding (beyond a row's length) is 0. Not reproduced: TreeRL's `fill_in_paths`, which
    replaces a segment's local advantage that is exactly 0 by its predecessor's.

    Unscored leaves (reward NaN: every reward function returned None), by TRL's rule for its group advantage: they
    are left out of the centring and of every node's value (a node's value and leaf count are over its scored leaves;
    a node with none has value 0), and an unscored leaf's own row is 0 throughout, so it moves nothing. The result
    is always finite.
    """
    if weighting not in TREE_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(map(repr, TREE_WEIGHTINGS))}; got {weighting!r}.")
    G = len(tree.parent)
    if rewards.numel() != G:
        raise ValueError(f"rewards has {rewards.numel()} entries for a group of {G}.")
    c = leave_one_out(rewards.reshape(-1))  # (G,), NaN for unscored leaves
    scored = ~torch.isnan(c)
    out = torch.zeros(G, width, dtype=torch.float64)

    def value(leaves: list[int]) -> float:
        kept = [i for i in leaves if scored[i]]
        if not kept:  # no scored leaf below: no signal
            return 0.0
        v = float(c[kept].mean())
        return v / math.sqrt(len(kept)) if weighting == "sqrt" else v

    top = value(list(range(G)))  # the group's root: mean of the centred values (0 up to rounding)
    for i in range(tree.num_roots, G):  # fresh samples: a chain of one segment below the group's root
        if tree.fork[i] == 0:
            v = value([i])
            out[i, : tree.lengths[i]] = (v - top) + v
    for root in range(tree.num_roots):
        branches = tree.branches_of(root)
        cuts = sorted({tree.fork[b] for b in branches})
        bounds = [0, *cuts, tree.lengths[root]]
        parent_value = top
        segment_values = []  # (start, end, value of the segment's tokens)
        for j in range(len(bounds) - 1):
            start, end = bounds[j], bounds[j + 1]
            below = [root] + [b for b in branches if tree.fork[b] > start]  # the root, and branches forked later
            v = value(below)
            segment_values.append((start, end, (v - parent_value) + v))
            for b in branches:
                if tree.fork[b] == end:  # forked where this segment ends: a leaf below this segment
                    vb = value([b])
                    out[b, end : tree.lengths[b]] = (vb - v) + vb
            parent_value = v
        for start, end, a in segment_values:
            out[root, start:end] = a
            for b in branches:  # the copied prefix of each branch: its root's values there
                stop = min(end, tree.fork[b])
                if start < stop:
                    out[b, start:stop] = a
    out[~scored] = 0.0  # an unscored leaf's tokens: no credit, as TRL's advantage 0
    return out.float()
