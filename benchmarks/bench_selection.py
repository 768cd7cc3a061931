"""Selection cost: forking_trl's radix select vs TRL's `get_high_entropy_mask` (all-gather + torch.quantile).

    python benchmarks/bench_selection.py            # time at 1M / 16.7M / 64M tokens; bytes at 2, 4, 8 processes
    python benchmarks/bench_selection.py --quick    # 100k tokens; bytes at 2 processes (the test suite runs this)

1. Time per selection in one process, both methods side by side, median of --repeats. TRL's path is called as TRL
   calls it, with an `Accelerator` (its gather is the identity in one process). torch.quantile raises above
   16,777,216 elements, so TRL has no figure at 64M.
2. Bytes communicated per selection against world size, with real gloo processes on this machine: every
   collective is wrapped and the payload each process receives is added up (all-reduce: the tensor; all-gather:
   the gathered output). Each process holds --tokens-per-rank valid tokens.
"""

import argparse
import os
import socket
import statistics
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forking_trl import forking_select

QUANTILE_LIMIT = 16_777_216


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def skewed_entropies(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 3) ** 3  # most values small, a long tail: like real token entropies


def time_table(sizes, repeats):
    from accelerate import Accelerator
    from trl import GRPOTrainer

    fake = SimpleNamespace(accelerator=Accelerator(cpu=True))
    print(f"Time per selection, one process (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {repeats})")
    print(f"{'tokens':>12}{'forking_trl s':>15}{'TRL s':>10}{'TRL / ours':>12}")
    for n in sizes:
        entropies, mask = skewed_entropies(n), torch.ones(n, dtype=torch.bool)
        ours = timed(lambda e=entropies, m=mask: forking_select(e, m, ratio=0.2), repeats)
        if n <= QUANTILE_LIMIT:
            theirs = timed(lambda e=entropies, m=mask: GRPOTrainer.get_high_entropy_mask(fake, e, m, 0.8), repeats)
            print(f"{n:>12,}{ours:>15.3f}{theirs:>10.3f}{theirs / ours:>11.1f}x")
        else:
            print(f"{n:>12,}{ours:>15.3f}{'raises':>10}{'-':>12}")


# ------------------------------------------------------------------------------------------------------------------
# bytes against world size


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bytes_worker(rank, world, port, tokens, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from accelerate import Accelerator
    from trl import GRPOTrainer

    accelerator = Accelerator(cpu=True)  # initialises the gloo group from the environment
    received = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor")}

    def counting(name):
        def wrapper(*args, **kwargs):
            if name == "all_reduce":
                received.append(args[0].numel() * args[0].element_size())
            elif name == "all_gather":  # (list of outputs, input)
                received.append(sum(t.numel() * t.element_size() for t in args[0]))
            else:  # (output, input)
                received.append(args[0].numel() * args[0].element_size())
            return originals[name](*args, **kwargs)

        return wrapper

    for name in originals:
        setattr(dist, name, counting(name))
    entropies = skewed_entropies(tokens, seed=rank)
    mask = torch.ones(tokens, dtype=torch.bool)
    row = {}
    for label, fn in (
        ("forking_trl", lambda: forking_select(entropies, mask, ratio=0.2, group=dist.group.WORLD)),
        ("forking_trl exact", lambda: forking_select(entropies, mask, ratio=0.2, selection="exact",
                                                     group=dist.group.WORLD)),
        ("TRL", lambda: GRPOTrainer.get_high_entropy_mask(SimpleNamespace(accelerator=accelerator), entropies,
                                                          mask, 0.8)),
    ):
        received.clear()
        fn()
        row[label] = sum(received)
    for name, fn in originals.items():
        setattr(dist, name, fn)
    if rank == 0:
        queue.put(row)
    dist.destroy_process_group()


def bytes_table(worlds, tokens):
    print(f"\nBytes received per process per selection, gloo, {tokens:,} valid tokens on each process")
    print(f"{'processes':>10}{'total tokens':>14}{'forking_trl':>13}{'(exact)':>10}{'TRL':>14}{'TRL / ours':>12}")
    ctx = mp.get_context("spawn")
    for world in worlds:
        queue = ctx.Queue()
        mp.start_processes(_bytes_worker, args=(world, _free_port(), tokens, queue), nprocs=world, join=True,
                           start_method="spawn")
        row = queue.get()
        ours, exact, theirs = row["forking_trl"], row["forking_trl exact"], row["TRL"]
        print(f"{world:>10}{world * tokens:>14,}{ours:>13,}{exact:>10,}{theirs:>14,}{theirs / ours:>11.0f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, two processes (for the tests)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per size (median reported)")
    parser.add_argument("--tokens-per-rank", type=int, default=None, help="valid tokens per process (bytes table)")
    args = parser.parse_args()
    time_table([100_000] if args.quick else [1_000_000, 16_700_000, 64_000_000], args.repeats)
    tokens = args.tokens_per_rank or (10_000 if args.quick else 1_000_000)
    bytes_table([2] if args.quick else [2, 4, 8], tokens)


if __name__ == "__main__":
    main()
