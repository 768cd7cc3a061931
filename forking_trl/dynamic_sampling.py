"""DAPO's dynamic sampling as pure tensor functions (Yu et al., arXiv 2503.14476, Sec. 3.2; verl's `filter_groups`).

A group (the completions of one prompt) whose rewards are all equal has advantage 0 for every completion: it gives no
policy gradient, yet it fills the batch. Dynamic sampling drops such groups and fills the batch with informative
groups from further prompts. The trainer (`forking_trl.trainer`) feeds these functions and talks to TRL.
"""

from __future__ import annotations

import torch


# normalised rewards (`normalize_then_sum`) whose spread is below this are rounding, or the +1e-4 in TRL's
# denominators (a group mean of equal rewards need not equal them exactly): 0.1% of one function's group std
NORMALIZED_SPREAD_TOLERANCE = 1e-3


def training_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, aggregation: str
) -> torch.Tensor:
    """`(N,)` per-completion rewards whose spread within a group is what the advantage sees, for TRL's
    `multi_objective_aggregation`: `"sum_then_normalize"`, the weighted sum of the raw rewards; `"normalize_then_sum"`,
    the weighted sum of each function's rewards normalised within the group (mean 0, std 1 with Bessel's correction,
    as TRL), so that a group whose raw totals tie can still be informative, and the reverse. NaN where every
    function returned None (unscorable)."""
    per_func = rewards_per_func.float()  # (N, F)
    w = weights.to(per_func.device, per_func.dtype)
    if aggregation == "normalize_then_sum":
        grouped = per_func.view(-1, num_generations, per_func.size(1))  # (groups, G, F)
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1).clamp(min=1)
        std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
        per_func = ((grouped - mean) / (std + 1e-4)).view(-1, per_func.size(1))
    elif aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum'; got {aggregation!r}."
        )
    total = (per_func * w).nansum(dim=1)
    total[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
    return total


def informative_groups(rewards: torch.Tensor, num_generations: int, tolerance: float = 0.0) -> torch.Tensor:
    """Which groups have a reward spread.

    Args:
        rewards: `(N,)` reward of each completion (one function's, or `training_rewards`), groups of
            `num_generations` consecutive completions; NaN for an unscorable completion (ignored).

    Returns:
        `(N // num_generations,)` bool: at least two scorable completions whose rewards differ by more than
        `tolerance` (raw rewards: any difference, since advantages are scaled by the group's std;
        `normalize_then_sum`: `NORMALIZED_SPREAD_TOLERANCE`).
    """
    grouped = rewards.reshape(-1, num_generations).float()  # (groups, G)
    finite = torch.isfinite(grouped)
    high = torch.where(finite, grouped, float("-inf")).amax(dim=1)
    low = torch.where(finite, grouped, float("inf")).amin(dim=1)
    return (finite.sum(dim=1) >= 2) & (high - low > tolerance)


def take_groups(informative: torch.Tensor, needed: int) -> torch.Tensor:
    """Indices of the first `needed` informative groups (fewer if there are fewer), `(k,)` long."""
    return informative.nonzero().flatten()[: max(needed, 0)]


def fill_groups(informative: torch.Tensor, taken: torch.Tensor, needed: int) -> torch.Tensor:
    """When the round limit is reached short of informative groups: the first `needed` groups of the round that were
    not taken (uninformative ones: advantage 0, so no policy gradient), `(k,)` long."""
    free = torch.ones_like(informative)
    free[taken] = False
    return free.nonzero().flatten()[: max(needed, 0)]


def group_rows(groups: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Row indices of the completions of `groups`, `(len(groups) * num_generations,)`."""
    offsets = torch.arange(num_generations, device=groups.device)
    return (groups.unsqueeze(1) * num_generations + offsets).flatten()


def stack_rows(
    parts: list[tuple[dict, torch.Tensor]], *, left_padded: tuple[str, ...], pad_values: dict[str, float]
) -> dict:
    """Concatenate chosen rows of several batches of per-sample tensors, padding their lengths to the longest.

    Args:
        parts: `(batch, rows)` pairs: a dict of tensors whose first dim is the batch, and the rows to keep.
        left_padded: keys padded on the left (prompts); every other tensor of 2+ dims is padded on the right.
        pad_values: padding value per key (default 0).

    Returns:
        One dict with the same keys. Non-tensor values and 0-dim tensors are taken from the first batch.
    """
    first = parts[0][0]
    out = {}
    for key, value in first.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
            continue
        pieces = [batch[key][rows.to(batch[key].device)] for batch, rows in parts]
        if value.dim() >= 2:
            width = max(p.size(1) for p in pieces)
            pad = pad_values.get(key, 0)
            pieces = [_pad_dim1(p, width, pad, left=key in left_padded) for p in pieces]
        out[key] = torch.cat(pieces, dim=0)
    return out


def _pad_dim1(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    if x.size(1) == width:
        return x
    shape = list(x.shape)
    shape[1] = width - x.size(1)
    filler = torch.full(shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([filler, x] if left else [x, filler], dim=1)
