"""Which completion tokens receive policy gradient: the forking-token selection.

"Beyond the 80/20 Rule" (arXiv 2506.01939) keeps the policy-gradient term only for tokens whose entropy is at or
above the threshold tau, the top-rho quantile of the batch. This module computes that selection, and its controls,
from a tensor of per-token values and a validity mask. Pure torch (plus `torch.distributed` when a process group is
given); nothing here imports TRL or the rest of the package.

Definitions (n = number of valid, finite tokens in the scope; rho = `ratio`):
- `top`: k = ceil(rho * n) tokens with the highest values. `threshold` keeps every token >= tau, tau the k-th
  largest value (ties at tau all kept, so possibly more than k); `exact` keeps exactly k, ties at tau broken by
  position (earlier first; across processes, lower rank first).
- `bottom`: the complement of `top` with ratio 1 - rho, so `top(rho)` and `bottom(1 - rho)` split the valid tokens
  exactly (the paper's "bottom 80%" ablation is `bottom` with 0.8: every token the top 20% drops).
- `random`: exactly ceil(rho * n) uniformly random tokens, the same count `top` aims at (the control that separates
  "entropy" from "sparsity").
- `all`: every valid token.

Exact at any size: tau is found by a radix select over the bits of the float32 values (four rounds of a 256-bin
histogram), never by sorting or `torch.quantile`. Over a process group each round all-reduces one histogram, so a
selection communicates about 8 KiB (10 KiB with `exact` ties; 12 KiB above 256 processes) whatever the token
count or the number of processes, and every process gets the same tau. A process with no valid tokens takes part
with empty histograms.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

MODES = ("top", "bottom", "all", "random")
SELECTIONS = ("threshold", "exact")
RATIO_SCHEDULES = ("constant", "linear", "cosine")  # ρ over training, from forking_ratio to forking_ratio_end

_BINS = 256
# Slack for ceil(rho * n): 0.2 * 15 is 3.0000000000000004 in floating point and must give 3, not 4.
_CEIL_SLACK = 1e-6


@dataclass(frozen=True)
class ForkingSelection:
    """The result of a selection.

    Counts are over the selection's scope: all processes of `group` for a global selection (every process sees the
    same numbers), one entry per row with `per_sequence=True`.
    """

    mask: torch.Tensor  # like the input, bool: the tokens that receive policy gradient
    threshold: torch.Tensor  # () or (B,) float32: tau (kept: >= tau for top, < tau for bottom); NaN if undefined
    num_valid: torch.Tensor  # () or (B,) int64: valid finite tokens in the scope
    num_kept: torch.Tensor  # () or (B,) int64: kept tokens in the scope
    num_nonfinite: int  # valid tokens whose value was NaN or inf: excluded from the selection, never kept


def check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    """`ValueError` naming `name` and the allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def check_selection_args(mode: str, ratio: float, selection: str, *, prefix: str = "") -> None:
    """Raise a `ValueError` naming the argument (`prefix` + its name) and the allowed values when one is off."""
    check_choice(f"{prefix}mode", mode, MODES)
    check_choice(f"{prefix}selection", selection, SELECTIONS)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < ratio <= 1.0):
        raise ValueError(f"{prefix}ratio must be a float in (0, 1]; got {ratio!r}.")


def scheduled_ratio(schedule: str, start: float, end: float | None, step: int, total_steps: int) -> float:
    """ρ at optimizer step `step` (0-based) of a run of `total_steps`: `start` at the first step, `end` at the last.

    `"constant"`: `start` throughout. `"linear"`: start + (end − start)·p. `"cosine"`: end + (start − end)·(1 +
    cos(π·p))/2, flat at both ends. p = step / (total_steps − 1), clamped to [0, 1] (a single-step run: p = 0).
    """
    check_choice("forking_ratio_schedule", schedule, RATIO_SCHEDULES)
    if schedule == "constant":
        return start
    p = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * p
    return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0


def keep_count(n: int, ratio: float) -> int:
    """ceil(ratio * n), robust to floating-point noise, clamped to [0, n]."""
    return min(n, max(0, math.ceil(ratio * n - _CEIL_SLACK)))


def forking_mask(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "top",
    ratio: float = 0.2,
    selection: str = "threshold",
    per_sequence: bool = False,
    group: dist.ProcessGroup | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask of the tokens that receive policy gradient; see `forking_select` for the arguments."""
    return forking_select(
        entropies,
        mask,
        mode=mode,
        ratio=ratio,
        selection=selection,
        per_sequence=per_sequence,
        group=group,
        generator=generator,
    ).mask


def forking_select(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "top",
    ratio: float = 0.2,
    selection: str = "threshold",
    per_sequence: bool = False,
    group: dist.ProcessGroup | None = None,
    generator: torch.Generator | None = None,
) -> ForkingSelection:
    """Select the forking tokens.

    Args:
        entropies: `(B, T)` (any shape) per-token values, usually entropies; read as float32, never modified.
        mask: same shape; nonzero marks a valid completion token. Padding (0) is never kept.
        mode: `"top"`, `"bottom"`, `"all"` or `"random"` (see the module docstring).
        ratio: rho in (0, 1]; ignored by `"all"`.
        selection: `"threshold"` (keep >= tau, ties kept) or `"exact"` (exactly the count, position tie-break).
            `"random"` always keeps an exact count.
        per_sequence: select within each row on its own (rows are sequences); `group` is then not used.
        group: a `torch.distributed` process group: select over the union of all its processes' valid tokens
            (in rank order, then row-major order), every process calling with its own shard. `None`: this process.
        generator: random source for `"random"`.

    Returns:
        A `ForkingSelection`; its `mask` has the shape of `entropies`.
    """
    check_selection_args(mode, ratio, selection)
    if entropies.shape != mask.shape:
        raise ValueError(f"entropies {tuple(entropies.shape)} and mask {tuple(mask.shape)} must have the same shape.")
    if per_sequence and entropies.dim() != 2:
        raise ValueError(f"per_sequence=True needs (B, T) inputs; got shape {tuple(entropies.shape)}.")
    if group is not None and not dist.is_initialized():
        raise ValueError("a process group was given but torch.distributed is not initialized.")

    values = entropies.detach().float()  # no copy when already float32
    valid = mask.bool() & torch.isfinite(values)
    all_valid = bool(valid.all())
    nonfinite = torch.zeros((), dtype=torch.int64) if all_valid else (mask.bool() & ~valid).sum()

    if mode == "random":
        # uniform keys on every token; selecting the top share of them is a uniformly random subset
        device = generator.device if generator is not None else values.device
        values = torch.rand(values.shape, generator=generator, device=device).to(values.device)
        mode, selection = "top", "exact"

    if per_sequence:
        return _select_rows(values, valid, mode, ratio, selection, int(nonfinite))
    return _select_global(values, valid, all_valid, mode, ratio, selection, nonfinite, group)


def percentiles(
    values: torch.Tensor, mask: torch.Tensor, qs: tuple[float, ...], *, group: dist.ProcessGroup | None = None
) -> list[float]:
    """Exact nearest-rank percentiles of the valid, finite values over all processes of `group`.

    The q-th percentile is the ⌈q/100 · n⌉-th smallest of the n valid values (the smallest for q = 0), found by the
    same radix select as the selection: about 8 KiB communicated per percentile whatever n or the world size, the
    same answer on every process. NaN for every q when no process has a valid value.
    """
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentiles must be in [0, 100]; got {q!r}.")
    values = values.detach().float()
    valid = mask.bool() & torch.isfinite(values)
    keys = _order_keys(values[valid])  # (n_local,)
    n = int(_all_reduce(_count(keys.numel(), keys.device), group).item())
    if n == 0:
        return [math.nan] * len(qs)
    out = []
    for q in qs:
        k_smallest = max(1, math.ceil(q / 100 * n - _CEIL_SLACK))
        key, _, _ = _kth_largest(keys, n - k_smallest + 1, group)
        out.append(_key_to_float(key))
    return out


# ----------------------------------------------------------------------------------------------------------------
# per sequence: a stable sort per row (rows are at most a few tens of thousands of tokens)


def _select_rows(values, valid, mode, ratio, selection, nonfinite) -> ForkingSelection:
    n = valid.sum(dim=1)  # (B,)
    if mode == "all":
        threshold = torch.where(valid, values, math.inf).amin(dim=1)
        threshold = torch.where(n > 0, threshold, math.nan)
        return ForkingSelection(valid, threshold, n, n.clone(), nonfinite)

    top_ratio = ratio if mode == "top" else 1.0 - ratio
    k = torch.clamp(torch.ceil(top_ratio * n.double() - _CEIL_SLACK), min=0).long()  # (B,)
    k = torch.minimum(k, n)
    keyed = torch.where(valid, values, -math.inf)  # (B, T): padding sorts last
    sorted_vals, order = torch.sort(keyed, dim=1, descending=True, stable=True)  # ties: earlier position first
    idx = (k - 1).clamp(min=0).unsqueeze(1)  # (B, 1)
    tau = torch.where(k > 0, sorted_vals.gather(1, idx).squeeze(1), math.inf)  # (B,): +inf keeps nothing

    if selection == "threshold":
        top = valid & (values >= tau.unsqueeze(1))
    else:
        positions = torch.arange(order.size(1), device=order.device).expand_as(order)
        rank_in_row = torch.empty_like(order).scatter_(1, order, positions)  # (B, T): place in the sorted row
        top = valid & (rank_in_row < k.unsqueeze(1))
    keep = top if mode == "top" else valid & ~top
    threshold = torch.where(n > 0, tau, math.nan).float()
    return ForkingSelection(keep, threshold, n, keep.sum(dim=1), nonfinite)


# ----------------------------------------------------------------------------------------------------------------
# global: radix select over the float32 bits, one all-reduced 256-bin histogram per byte


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the order of the finite float32 `values` (-0.0 and +0.0 equal)."""
    bits = values.contiguous().view(torch.int32)
    if bits.numel() == 0 or int(bits.min()) >= 0:  # no sign bit set (entropies): the bits are the keys, no copy
        return bits
    neg = bits >> 31  # -1 where negative, else 0
    # negative floats: flip the magnitude bits (larger magnitude, smaller key), then +1 so -0.0 lands on +0.0's 0
    return (bits ^ (neg & 0x7FFFFFFF)) - neg


def _key_to_float(key: int) -> float:
    bits = key if key >= 0 else (key - 1) ^ 0x7FFFFFFF
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _digit(keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Byte of the keys at `shift`, as 0..255 in key order (the top byte carries the sign)."""
    if shift == 24:
        return (keys >> 24) + 128
    return (keys >> shift) & 0xFF


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _pick_bin(hist: torch.Tensor, k: int, from_top: bool) -> tuple[int, int]:
    """The bin holding the k-th item counting from the top (or bottom) bin, and the items in the bins before it."""
    counts = hist.flip(0) if from_top else hist
    cum = counts.cumsum(0)
    j = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device, dtype=cum.dtype)).item())
    before = int(cum[j - 1].item()) if j > 0 else 0
    return (_BINS - 1 - j if from_top else j), before


def _kth_largest(keys: torch.Tensor, k: int, group) -> tuple[int, int, int]:
    """Key of the k-th largest of all processes' keys (k >= 1, identical on every process).

    Returns (key, number of keys strictly greater, number of keys equal), all global.
    """
    cand = keys
    prefix = 0
    greater = 0
    equal = 0
    for shift in (24, 16, 8, 0):
        digit = _digit(cand, shift)
        hist = _all_reduce(torch.bincount(digit, minlength=_BINS), group)  # (256,) int64: 2 KiB on the wire
        b, before = _pick_bin(hist, k, from_top=True)
        k -= before
        greater += before
        equal = int(hist[b].item())
        prefix |= ((b - 128) if shift == 24 else b) << shift
        cand = cand[digit == b]
    # the assembled bytes form a 32-bit two's-complement key
    key = prefix - (1 << 32) if prefix >= (1 << 31) else prefix
    return key, greater, equal


def _rank_and_world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _ties_to_keep_here(local_ties: int, need: int, group, device) -> int:
    """How many of this process's tied tokens to keep so that `need` ties are kept globally, lower ranks first.

    A radix walk over the rank number, weighted by each process's tie count: one 256-bin all-reduce for up to 256
    processes, two for up to 65,536. Constant communication, the same answer on every process.
    """
    rank, world = _rank_and_world(group)
    if world == 1:
        return min(local_ties, need)
    lower = 0  # ties on the ranks before the boundary rank
    boundary = 0  # the rank whose ties straddle the count; its high byte is fixed first
    for shift in (8, 0) if world > _BINS else (0,):
        hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
        if rank >> (shift + 8) == boundary >> (shift + 8):  # this rank is still a candidate
            hist[(rank >> shift) & 0xFF] = local_ties
        b, before = _pick_bin(_all_reduce(hist, group), need - lower, from_top=False)
        lower += before
        boundary |= b << shift
    if rank < boundary:
        return local_ties
    return need - lower if rank == boundary else 0


def _select_global(values, valid, all_valid, mode, ratio, selection, nonfinite, group) -> ForkingSelection:
    device = values.device
    # (n_local,) the valid values; the final mask compares floats directly, so only this set needs keys
    local = values.reshape(-1) if all_valid else values[valid]

    # one small exchange for the token counts: [valid, nonfinite]
    counts = _all_reduce(torch.stack([torch.tensor(local.numel(), device=device), nonfinite.to(device)]), group)
    n, n_nonfinite = int(counts[0].item()), int(counts[1].item())
    n_t = _count(n, device)

    if mode == "all":
        lo = local.min() if local.numel() else torch.tensor(math.inf, device=device)
        if group is not None:
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        tau = float(lo.item()) if n > 0 else math.nan
        return ForkingSelection(valid, _scalar(tau, device), n_t, n_t.clone(), n_nonfinite)

    top_ratio = ratio if mode == "top" else 1.0 - ratio
    k = keep_count(n, top_ratio)
    if k == 0:  # nothing in the top share: top keeps nothing, bottom keeps everything
        top = torch.zeros_like(valid)
        tau = math.inf if n > 0 else math.nan
        kept_top = 0
    else:
        tau_key, greater, equal = _kth_largest(_order_keys(local), k, group)
        tau = _key_to_float(tau_key)
        if selection == "threshold":
            top = valid & (values >= tau)
            kept_top = greater + equal
        else:
            top = valid & (values > tau)
            ties = valid & (values == tau)
            take = _ties_to_keep_here(int(ties.sum().item()), k - greater, group, device)
            if take > 0:
                flat_ties = ties.flatten().nonzero().squeeze(1)[:take]  # earliest positions first
                top = top.flatten().index_fill_(0, flat_ties, True).view_as(top)
            kept_top = k
    if mode == "top":
        return ForkingSelection(top, _scalar(tau, device), n_t, _count(kept_top, device), n_nonfinite)
    keep = valid & ~top
    return ForkingSelection(keep, _scalar(tau, device), n_t, _count(n - kept_top, device), n_nonfinite)


def _scalar(x: float, device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=device)


def _count(x: int, device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int64, device=device)
