"""Time per selection: forking_trl's radix select vs TRL's `get_high_entropy_mask` (torch.quantile), one process.

    python benchmarks/bench_selection.py            # 1M, 16.7M (just under torch.quantile's limit), 64M tokens
    python benchmarks/bench_selection.py --quick    # 100k tokens, for the test suite

Ratios are measured side by side in one run (median of --repeats). TRL's path is called as TRL calls it: with an
`Accelerator` whose gather is the identity in one process. Above 16,777,216 tokens torch.quantile raises.
"""

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from forking_trl import forking_select

QUANTILE_LIMIT = 16_777_216


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [100_000] if args.quick else [1_000_000, 16_700_000, 64_000_000]

    from accelerate import Accelerator
    from trl import GRPOTrainer

    fake = SimpleNamespace(accelerator=Accelerator(cpu=True))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'tokens':>12}{'forking_trl s':>15}{'TRL quantile s':>16}{'speed-up':>10}")
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        entropies = (torch.rand(n, generator=g) * 3) ** 3  # skewed, like real entropies
        mask = torch.ones(n, dtype=torch.bool)
        ours = timed(lambda: forking_select(entropies, mask, ratio=0.2), args.repeats)
        if n <= QUANTILE_LIMIT:
            theirs = timed(lambda: GRPOTrainer.get_high_entropy_mask(fake, entropies, mask, 0.8), args.repeats)
            print(f"{n:>12,}{ours:>15.3f}{theirs:>16.3f}{theirs / ours:>9.1f}x")
        else:
            print(f"{n:>12,}{ours:>15.3f}{'raises':>16}{'-':>10}")


if __name__ == "__main__":
    main()
