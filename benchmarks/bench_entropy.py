"""`token_entropy` against TRL's `entropy_from_logits` and a naive full softmax at Qwen's vocabulary (151,936): time,
memory, and on a GPU the bandwidth reached.

    python benchmarks/bench_entropy.py                      # CPU: 2,048 positions of bf16 logits (594 MiB)
    python benchmarks/bench_entropy.py --quick              # 64 positions (the test suite runs this)
    python benchmarks/bench_entropy.py --device cuda        # one GPU: 8,192 positions (2.3 GiB), CUDA events

Naive: `-(softmax(x.float()) * log_softmax(x.float())).sum(-1)`, which materialises several float32 copies of the
(N, V) logits. TRL: `trl.trainer.utils.entropy_from_logits` (what `GRPOTrainer` computes its entropies with; on a
GPU with Triton, its fused kernel). Each method runs in its own child process, so its peak memory is its own: on CPU
the peak resident set above the resident size right after the logits were made, on CUDA the peak allocated above
the logits (`torch.cuda.max_memory_allocated`). Times are the median of --repeats after one warm-up call, timed
with CUDA events on a GPU. Every method is checked against the entropy in float64 on the first 8 rows (`max
|error|`): a method that computes in the logits' bf16 shows it there.

Bandwidth (CUDA): each method must read the logits once (N·V·2 bytes), so bytes / time is the read bandwidth it
reached; beside it, the device's copy bandwidth measured in the same run (a device-to-device copy of the logits:
read and write) says how near the memory limit that is.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VOCAB = 151_936
METHODS = ("token_entropy", "trl_entropy_from_logits", "naive")
NAMES = {
    "token_entropy": "token_entropy",
    "trl_entropy_from_logits": "TRL entropy_from_logits",
    "naive": "naive softmax",
}


def naive(x):
    import torch

    x = x.float()
    return -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)


def child(method: str, positions: int, repeats: int, device: str) -> None:
    import torch

    from forking_trl import token_entropy

    cuda = device == "cuda"
    torch.manual_seed(0)
    logits = torch.empty(positions, VOCAB, dtype=torch.bfloat16, device=device)
    for start in range(0, positions, 64):  # filled in slices: no float32 transient inflates the baseline
        rows = min(64, positions - start)
        logits[start : start + rows] = torch.randn(rows, VOCAB, device=device) * 3
    if method == "token_entropy":
        fn = token_entropy
    elif method == "trl_entropy_from_logits":
        from trl.trainer.utils import entropy_from_logits as fn
    else:
        fn = naive
    # the resident set's high-water mark only rises: on CPU the baseline is taken before the warm-up call
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (ru_maxrss is KiB on Linux)
    out = fn(logits)  # warm-up (a kernel's compilation, the allocator's first blocks)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn(logits)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            out = fn(logits)
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    first = logits[:8].double()
    reference = -(torch.softmax(first, -1) * torch.log_softmax(first, -1)).sum(-1)  # float64 throughout
    result = {
        "seconds": statistics.median(times),
        "peak_mib": peak / 2**20,
        "max_abs_err_first8": float((out[:8].double() - reference).abs().max()),
    }
    if cuda:
        seconds = result["seconds"]
        result["read_gbps"] = logits.numel() * logits.element_size() / seconds / 1e9
        copy = torch.empty_like(logits)
        copies = []
        for _ in range(max(3, repeats)):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            copy.copy_(logits)
            end.record()
            torch.cuda.synchronize()
            copies.append(begin.elapsed_time(end) / 1000)
        result["copy_gbps"] = 2 * logits.numel() * logits.element_size() / statistics.median(copies) / 1e9
        result["device_name"] = torch.cuda.get_device_name()
    print(json.dumps(result))


def run(method, positions, repeats, device):
    command = [sys.executable, __file__, "--child", method, "--positions", str(positions), "--repeats", str(repeats)]
    done = subprocess.run([*command, "--device", device], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--positions", type=int, default=None, help="rows of logits (default 2048 on CPU, 8192 on CUDA; 64 quick)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    positions = args.positions or (64 if args.quick else 8192 if args.device == "cuda" else 2048)
    if args.child:
        child(args.child, positions, args.repeats, args.device)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False).")
    results = {m: run(m, positions, args.repeats, args.device) for m in METHODS}
    size_mib = positions * VOCAB * 2 / 2**20
    print(f"Entropy of {positions:,} x {VOCAB:,} bf16 logits ({size_mib:,.0f} MiB) on {args.device}, median of "
          f"{args.repeats}")  # fmt: skip
    cuda = args.device == "cuda"
    header = f"{'method':>26}{'seconds':>10}{'peak MiB above logits':>24}{'max |error|':>13}"
    print(header + (f"{'read GB/s':>11}{'of copy':>9}" if cuda else ""))
    for method, r in results.items():
        if "error" in r:
            print(f"{NAMES[method]:>26}  failed: {r['error']}")
            continue
        line = f"{NAMES[method]:>26}{r['seconds']:>10.4f}{r['peak_mib']:>24,.0f}{r['max_abs_err_first8']:>13.1e}"
        if cuda:
            line += f"{r['read_gbps']:>11,.0f}{100 * r['read_gbps'] / r['copy_gbps']:>8.0f}%"
        print(line)
    ours, naive_r, trl = results["token_entropy"], results["naive"], results["trl_entropy_from_logits"]
    if "error" not in ours and "error" not in naive_r:
        print(f"naive / token_entropy: time {naive_r['seconds'] / ours['seconds']:.2f}x, "
              f"memory {naive_r['peak_mib'] / max(ours['peak_mib'], 1):.1f}x; "
              f"max |difference| {ours['max_abs_err_first8']:.2e} nats")  # fmt: skip
    if "error" not in ours and "error" not in trl:
        print(f"TRL / token_entropy: time {trl['seconds'] / ours['seconds']:.2f}x, "
              f"memory {trl['peak_mib'] / max(ours['peak_mib'], 1):.1f}x")  # fmt: skip
    if cuda and "error" not in ours:
        print(f"device copy bandwidth (read + write) measured in this run: {ours['copy_gbps']:,.0f} GB/s "
              f"({ours['device_name']}); 'of copy' is each method's read bandwidth against it")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "positions": positions, "vocab": VOCAB, "methods": results}, f, indent=2)
    if any("error" in r for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
