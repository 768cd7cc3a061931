import math

import pytest
import torch

from forking_trl import forking_mask, forking_select
from forking_trl.selection import keep_count

# Two completions, padded to 5: valid values 0.5 2 2 0.1 | 3 2 0 ; the padding holds 9.9 and 0.0 (never kept)
E = torch.tensor([[0.5, 2.0, 2.0, 0.1, 9.9], [3.0, 2.0, 0.0, 0.0, 0.0]])
M = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])


def as_mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------------
# hand-built cases, every mode x selection x per_sequence


def test_top_threshold_keeps_all_ties_at_tau():
    # n = 7, k = ceil(0.3 * 7) = 3; the 3rd largest is 2.0, and three tokens hold 2.0
    sel = forking_select(E, M, mode="top", ratio=0.3, selection="threshold")
    assert torch.equal(sel.mask, as_mask([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]))
    assert sel.threshold.item() == 2.0 and sel.num_valid.item() == 7 and sel.num_kept.item() == 4


def test_top_exact_breaks_ties_by_position():
    sel = forking_select(E, M, mode="top", ratio=0.3, selection="exact")
    assert torch.equal(sel.mask, as_mask([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]))
    assert sel.num_kept.item() == 3


@pytest.mark.parametrize(
    "selection, expected",
    [
        ("threshold", [[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]]),  # everything the top-30% threshold drops
        ("exact", [[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]]),  # the complement of the exact top 3
    ],
)
def test_bottom_is_complement_of_top(selection, expected):
    sel = forking_select(E, M, mode="bottom", ratio=0.7, selection=selection)
    assert torch.equal(sel.mask, as_mask(expected))


@pytest.mark.parametrize("selection", ["threshold", "exact"])
def test_all_keeps_every_valid_token(selection):
    sel = forking_select(E, M, mode="all", selection=selection)
    assert torch.equal(sel.mask, M.bool())
    assert sel.num_kept.item() == 7 and sel.threshold.item() == 0.0


@pytest.mark.parametrize("selection", ["threshold", "exact"])
def test_random_keeps_exact_count_of_valid_tokens(selection):
    masks = [
        forking_select(E, M, mode="random", ratio=0.3, selection=selection, generator=torch.Generator().manual_seed(s))
        for s in range(20)
    ]
    for sel in masks:
        assert sel.mask.sum().item() == 3 and not (sel.mask & ~M.bool()).any()
    assert len({tuple(sel.mask.flatten().tolist()) for sel in masks}) > 1  # it is random...
    again = forking_mask(E, M, mode="random", ratio=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, masks[0].mask)  # ...and reproducible


@pytest.mark.parametrize(
    "mode, ratio, selection, expected",
    [
        # row 0: k = ceil(0.3 * 4) = 2 of 0.5 2 2 0.1; row 1: k = ceil(0.3 * 3) = 1 of 3 2 0
        ("top", 0.3, "threshold", [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
        ("top", 0.3, "exact", [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
        ("top", 0.2, "threshold", [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),  # k = 1 in row 0, two tokens tie at 2.0
        ("top", 0.2, "exact", [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
        ("bottom", 0.8, "threshold", [[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]]),
        ("bottom", 0.8, "exact", [[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]]),
        ("all", 0.2, "exact", [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    ],
)
def test_per_sequence(mode, ratio, selection, expected):
    sel = forking_select(E, M, mode=mode, ratio=ratio, selection=selection, per_sequence=True)
    assert torch.equal(sel.mask, as_mask(expected))
    assert sel.num_valid.tolist() == [4, 3]


def test_per_sequence_random_counts_per_row_and_empty_rows():
    e = torch.rand(3, 10)
    m = torch.ones(3, 10)
    m[1] = 0  # a completion that is all padding
    m[2, 5:] = 0
    sel = forking_select(e, m, mode="random", ratio=0.5, per_sequence=True, generator=torch.Generator().manual_seed(0))
    assert sel.mask.sum(1).tolist() == [5, 0, 3]
    assert math.isnan(sel.threshold[1].item())


# ---------------------------------------------------------------------------------------------------------------
# against a slow reference on random tensors with padding and many ties


def reference(values, mask, mode, ratio, selection):
    v, m = values.flatten().tolist(), mask.flatten().tolist()
    idx = [i for i in range(len(v)) if m[i] and math.isfinite(v[i])]

    def top(r):
        k = keep_count(len(idx), r)
        order = sorted(idx, key=lambda i: (-v[i], i))
        if k == 0:
            return set()
        if selection == "exact":
            return set(order[:k])
        return {i for i in idx if v[i] >= v[order[k - 1]]}

    keep = {"top": lambda: top(ratio), "bottom": lambda: set(idx) - top(1 - ratio), "all": lambda: set(idx)}[mode]()
    out = torch.zeros(len(v), dtype=torch.bool)
    out[sorted(keep)] = True
    return out.view(values.shape)


@pytest.mark.parametrize("mode", ["top", "bottom", "all"])
@pytest.mark.parametrize("selection", ["threshold", "exact"])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(mode, selection, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 6, (4, 9), generator=g).float() / 2  # heavy ties
    lengths = torch.randint(0, 10, (4,), generator=g)
    mask = torch.arange(9) < lengths[:, None]
    got = forking_mask(values, mask, mode=mode, ratio=ratio, selection=selection)
    assert torch.equal(got, reference(values, mask, mode, ratio, selection))
    rows = forking_mask(values, mask, mode=mode, ratio=ratio, selection=selection, per_sequence=True)
    for r in range(4):
        assert torch.equal(rows[r], reference(values[r], mask[r], mode, ratio, selection))


@pytest.mark.parametrize("selection", ["threshold", "exact"])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5])
def test_top_and_bottom_complement_split_the_valid_tokens(selection, per_sequence, ratio):
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 4, (5, 13), generator=g).float()
    mask = torch.rand(5, 13, generator=g) > 0.3
    kw = dict(selection=selection, per_sequence=per_sequence)
    top = forking_mask(values, mask, mode="top", ratio=ratio, **kw)
    bottom = forking_mask(values, mask, mode="bottom", ratio=1 - ratio, **kw)
    assert not (top & bottom).any()
    assert torch.equal(top | bottom, mask)


def test_negative_and_signed_zero_values_order_correctly():
    values = torch.tensor([-3.0, -0.0, 0.0, 1e-40, -1e-40, 2.5, -7.0, 1.0])
    mask = torch.ones_like(values)
    for k in range(1, 9):
        sel = forking_select(values, mask, ratio=k / 8, selection="exact")
        assert sel.mask.sum().item() == k
        assert sel.threshold.item() == sorted(values.tolist(), reverse=True)[k - 1]


# ---------------------------------------------------------------------------------------------------------------
# robustness


def test_nonfinite_values_are_excluded_and_counted():
    values = torch.tensor([[0.1, math.nan, 5.0, math.inf], [1.0, 2.0, -math.inf, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    sel = forking_select(values, mask, ratio=0.5)
    assert sel.num_nonfinite == 3 and sel.num_valid.item() == 4  # 0.1 5.0 1.0 2.0
    assert torch.equal(sel.mask, as_mask([[0, 0, 1, 0], [0, 1, 0, 0]]))
    assert sel.threshold.item() == 2.0
    rows = forking_select(values, mask, ratio=0.5, per_sequence=True)
    assert rows.num_nonfinite == 3 and not rows.mask[0, 1] and not rows.mask[0, 3]


def test_no_valid_tokens():
    sel = forking_select(torch.rand(2, 3), torch.zeros(2, 3))
    assert not sel.mask.any() and sel.num_valid.item() == 0 and math.isnan(sel.threshold.item())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="middle"), "mode"),
        (dict(selection="fuzzy"), "selection"),
        (dict(ratio=0.0), "ratio"),
        (dict(ratio=1.5), "ratio"),
        (dict(ratio=True), "ratio"),
    ],
)
def test_bad_arguments_name_the_field_and_the_allowed_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        forking_mask(E, M, **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        forking_mask(E, M[:, :3])


def test_keep_count_is_robust_to_float_noise():
    assert keep_count(15, 0.2) == 3  # 0.2 * 15 = 3.0000000000000004
    assert keep_count(16, 0.2) == 4 and keep_count(1, 0.2) == 1 and keep_count(0, 0.2) == 0


# ---------------------------------------------------------------------------------------------------------------
# exact at any size (torch.quantile raises above 16,777,216 elements)


def test_exact_on_twenty_million_tokens():
    n = 20_000_000
    g = torch.Generator().manual_seed(0)
    values = (torch.rand(n, generator=g) * 1000).round() / 100  # 100,001 distinct values: massive ties
    mask = torch.ones(n, dtype=torch.bool)
    mask[::7] = False  # padding
    valid = values[mask]
    k = keep_count(valid.numel(), 0.2)
    expected_tau = torch.kthvalue(valid, valid.numel() - k + 1).values.item()  # k-th largest

    sel = forking_select(values, mask, ratio=0.2)
    assert sel.threshold.item() == expected_tau
    assert sel.num_kept.item() == int((valid >= expected_tau).sum()) == int(sel.mask.sum())
    assert not (sel.mask & ~mask).any()

    exact = forking_select(values, mask, ratio=0.2, selection="exact")
    assert int(exact.mask.sum()) == k and exact.threshold.item() == expected_tau
    assert bool((values[exact.mask] >= expected_tau).all())
    assert int((exact.mask & (values > expected_tau)).sum()) == int((valid > expected_tau).sum())


# ---------------------------------------------------------------------------------------------------------------
# exact percentiles (the training-time entropy pattern metrics)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered) - 1e-6)) - 1]


def test_percentiles_with_padding_ties_and_nan():
    from forking_trl.selection import percentiles

    values = torch.tensor([[0.0, 0.0, 0.5, 0.5, 2.0, float("nan")], [1.0, 0.5, 3.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # padding holds 9.0: never counted
    valid = [0.0, 0.0, 0.5, 0.5, 2.0, 1.0, 0.5, 3.0]  # the NaN is left out too
    qs = (0, 10, 50, 80, 95, 100)
    assert percentiles(values, mask, qs) == [nearest_rank(valid, q) for q in qs]
    assert percentiles(values, mask, (50,)) == [0.5]  # ties: the 4th smallest of 8 is a tied 0.5
    assert all(math.isnan(x) for x in percentiles(values, torch.zeros_like(mask), (50, 80)))
    with pytest.raises(ValueError, match="percentiles must be in"):
        percentiles(values, mask, (101,))


def test_percentiles_on_many_random_values_match_a_sort():
    from forking_trl.selection import percentiles

    g = torch.Generator().manual_seed(3)
    values = torch.rand(64, 257, generator=g) ** 4  # skewed towards 0, like entropies
    mask = torch.rand(64, 257, generator=g) < 0.7
    kept = values[mask].tolist()
    qs = (50, 80, 95)
    assert percentiles(values, mask, qs) == [torch.tensor(nearest_rank(kept, q)).item() for q in qs]


def test_ratio_schedules_at_given_steps():
    """Issue 22: ρ from forking_ratio at the first optimizer step to forking_ratio_end at the last."""
    from forking_trl.selection import scheduled_ratio

    assert [scheduled_ratio("linear", 1.0, 0.2, s, 5) for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    cosine = [scheduled_ratio("cosine", 1.0, 0.2, s, 5) for s in range(5)]
    assert cosine == pytest.approx([1.0, 0.2 + 0.4 * (1 + math.sqrt(0.5)), 0.6, 0.2 + 0.4 * (1 - math.sqrt(0.5)), 0.2])
    assert scheduled_ratio("constant", 0.3, None, 7, 10) == 0.3
    assert scheduled_ratio("linear", 0.2, 0.8, 0, 1) == 0.2  # one step: the first is the last; starts at start
    assert scheduled_ratio("linear", 1.0, 0.2, 99, 5) == pytest.approx(0.2)  # past the end: held at the end
    assert scheduled_ratio("cosine", 0.2, 1.0, 2, 5) == pytest.approx(0.6)  # upward too
    with pytest.raises(ValueError, match="forking_ratio_schedule must be one of 'constant', 'linear', 'cosine'"):
        scheduled_ratio("step", 1.0, 0.2, 0, 5)
