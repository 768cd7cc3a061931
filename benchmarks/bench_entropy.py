"""`token_entropy` against a naive full-softmax entropy at a Qwen-sized vocabulary (151,936), time and memory.

    python benchmarks/bench_entropy.py            # 2,048 positions of bf16 logits (622 MB)
    python benchmarks/bench_entropy.py --quick    # 64 positions (the test suite runs this)

Naive: `-(softmax(x.float()) * log_softmax(x.float())).sum(-1)`, which materialises several float32 copies of the
(N, V) logits. Each method runs in its own child process, so its peak resident memory is its own; the figure is
the peak above the resident size right after the logits were made. Times are the median of --repeats, the two
methods alternating. Both results are checked to agree.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VOCAB = 151_936


def child(method: str, positions: int, repeats: int) -> None:
    import torch

    from forking_trl import token_entropy

    torch.manual_seed(0)
    logits = torch.empty(positions, VOCAB, dtype=torch.bfloat16)
    for start in range(0, positions, 64):  # filled in slices: no float32 transient inflates the baseline
        logits[start : start + 64] = torch.randn(min(64, positions - start), VOCAB) * 3
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def naive(x):
        x = x.float()
        return -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)

    fn = token_entropy if method == "token_entropy" else naive
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(logits)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reference = naive(logits[:8]).double()
    print(json.dumps({
        "seconds": statistics.median(times),
        "peak_mib": (peak - base) / 1024,
        "max_abs_err_first8": float((out[:8].double() - reference).abs().max()),
    }))


def run(method, positions, repeats):
    done = subprocess.run([sys.executable, __file__, "--child", method, "--positions", str(positions),
                           "--repeats", str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--positions", type=int, default=None, help="rows of logits (default 2048; 64 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    positions = args.positions or (64 if args.quick else 2048)
    if args.child:
        child(args.child, positions, args.repeats)
        return
    ours, naive = run("token_entropy", positions, args.repeats), run("naive", positions, args.repeats)
    size_mib = positions * VOCAB * 2 / 2**20
    print(f"Entropy of {positions:,} x {VOCAB:,} bf16 logits ({size_mib:,.0f} MiB), median of {args.repeats}")
    print(f"{'method':>16}{'seconds':>10}{'peak MiB above logits':>24}")
    for name, r in (("token_entropy", ours), ("naive softmax", naive)):
        print(f"{name:>16}{r['seconds']:>10.3f}{r['peak_mib']:>24,.0f}")
    print(f"naive / token_entropy: time {naive['seconds'] / ours['seconds']:.2f}x, "
          f"memory {naive['peak_mib'] / max(ours['peak_mib'], 1):.1f}x; "
          f"max |difference| {ours['max_abs_err_first8']:.2e} nats")


if __name__ == "__main__":
    main()
