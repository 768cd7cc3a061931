"""forking_mask over a real gloo process group equals the single-process selection on the concatenated tokens."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forking_trl import forking_select

CASES = [
    (mode, selection, ratio)
    for mode in ("top", "bottom", "all")
    for selection in ("threshold", "exact")
    for ratio in (0.2, 0.5)
]
BYTES_LIMIT = 16 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shards(world: int, seed: int):
    """Uneven shards with ties and padding; the last rank's completions are all padding."""
    g = torch.Generator().manual_seed(seed)
    rows = [3 + 2 * r for r in range(world)]
    out = []
    for r in range(world):
        values = torch.randint(0, 8, (rows[r], 11), generator=g).float() / 4  # ties across ranks
        lengths = torch.randint(1, 12, (rows[r],), generator=g)
        mask = torch.arange(11) < lengths[:, None]
        if r == world - 1:
            mask[:] = False
        out.append((values, mask))
    return out


def worker(rank: int, world: int, port: int, seed: int):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sent = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        parts = shards(world, seed)
        values, mask = parts[rank]
        all_values = torch.cat([p[0] for p in parts])  # rank order, then row-major: the tie-break order
        all_mask = torch.cat([p[1] for p in parts])
        offset = sum(p[0].shape[0] for p in parts[:rank])
        for mode, selection, ratio in CASES:
            sent.clear()
            got = forking_select(values, mask, mode=mode, ratio=ratio, selection=selection, group=dist.group.WORLD)
            ref = forking_select(all_values, all_mask, mode=mode, ratio=ratio, selection=selection)
            case = (rank, mode, selection, ratio)
            assert torch.equal(got.mask, ref.mask[offset : offset + values.shape[0]]), case
            assert torch.equal(got.threshold, ref.threshold), case
            assert got.num_kept.item() == ref.num_kept.item(), case
            assert got.num_valid.item() == ref.num_valid.item(), case
            assert sum(sent) <= BYTES_LIMIT, (case, sum(sent))

        # every rank draws its own random keys; the kept count is exact over the union
        got = forking_select(
            values,
            mask,
            mode="random",
            ratio=0.3,
            group=dist.group.WORLD,
            generator=torch.Generator().manual_seed(seed + rank),
        )
        kept = torch.tensor([got.mask.sum().item()])
        all_reduce(kept)
        assert kept.item() == got.num_kept.item() == -(-3 * int(all_mask.sum()) // 10)

        # tau identical on every rank, including the rank with no valid tokens
        tau = forking_select(values, mask, ratio=0.2, group=dist.group.WORLD).threshold.reshape(1)
        taus = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(taus, tau)
        assert all(torch.equal(t, taus[0]) for t in taus)
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world, seed", [(2, 0), (3, 1)])
def test_group_selection_equals_single_process(world, seed):
    mp.spawn(worker, args=(world, free_port(), seed), nprocs=world, join=True)


def test_bytes_on_the_wire_do_not_depend_on_token_count():
    """Count what `_all_reduce` would send for a 1k- and a 1M-token selection (world of 1, same code path)."""
    from forking_trl import selection as sel_mod

    def bytes_for(n):
        sent = []
        original = sel_mod._all_reduce

        def recording(t, group):
            sent.append(t.numel() * t.element_size())
            return t

        sel_mod._all_reduce = recording
        try:
            forking_select(torch.rand(n), torch.ones(n), ratio=0.2, selection="exact")
        finally:
            sel_mod._all_reduce = original
        return sum(sent)

    small, large = bytes_for(1_000), bytes_for(1_000_000)
    assert small == large <= BYTES_LIMIT


def percentile_worker(rank: int, world: int, port: int, results):
    from forking_trl.selection import percentiles

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    values, mask = shards(world, seed=5)[rank]
    results[rank] = percentiles(values, mask, (50, 80, 95), group=dist.group.WORLD)
    dist.destroy_process_group()


def test_percentiles_over_processes_equal_the_concatenation():
    from forking_trl.selection import percentiles

    world = 3
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(percentile_worker, args=(world, free_port(), results), nprocs=world, join=True)
    parts = shards(world, seed=5)
    values = torch.cat([v.flatten() for v, _ in parts])
    mask = torch.cat([m.flatten() for _, m in parts])
    expected = percentiles(values, mask, (50, 80, 95))
    assert [results[r] for r in range(world)] == [expected] * world
