"""Training-step time and peak memory, forking vs plain GRPO, on a tiny Qwen3 (CPU) or a random model at a real
Qwen3 shape (CPU or one GPU, bf16 there).

    python benchmarks/bench_step.py                     # tiny Qwen3 on CPU: 12 steps per run, 3 rounds
    python benchmarks/bench_step.py --quick             # 3 steps, 1 round (the test suite runs this)
    python benchmarks/bench_step.py --device cuda --model-shape qwen3-0.6b --steps 4 --rounds 1
    python benchmarks/bench_step.py --device cuda --model-shape qwen3-1.7b --variants grpo,forking,branching

Variants (same model, data, seed and batch: 16 completions of --completion-length tokens per step, 64 by default):
  grpo             GRPOTrainer, every token gets policy gradient
  grpo_quantile    GRPOTrainer(top_entropy_quantile=0.2), TRL's own mask
  forking          ForkingGRPOTrainer, top 0.2, forking_scope="micro_batch"
  forking_batch    ForkingGRPOTrainer, top 0.2, forking_scope="batch" (one extra no-grad forward per generation)
  forking_halfconst  ForkingGRPOTrainer, top 0.2, a reward constant for half the prompts (groups with no gradient)
  forking_dynamic  the same with dynamic_sampling=True: those groups are replaced by informative ones (DAPO)

  branching        BranchingGRPOTrainer: 2 roots of each group of 4, the other 2 branch from their forks (group credit)
  branching_tree   the same with TreeRL's tree advantages

`forking_halfconst` and `forking_dynamic` are the cost of dynamic sampling: its generation rounds per optimizer step
and its step time against the same run without it (`dynamic / halfconst`), and the share of the trained groups that
are informative in each. `branching` and `branching_tree` against `grpo` (independent sampling at the same G = 4):
the tokens sampled per step (a branch does not sample its copied prefix) and the step time (it adds a scoring
forward over the roots and a second generation call).

Each run is its own child process (so its peak memory is its own), the variants alternate within each round, and
the figure is the median over rounds of each run's median `step_time` (TRL's metric: generation, scoring and the
optimizer step), the first step left out as warm-up. Ratios are to `grpo`, measured in this run. The step is also
split into generation (TRL's `_generate`; for branching, its fork-scoring forward over the roots too), scoring (the
rest of `_generate_and_score_completions`: rewards, advantages, the old-log-prob pass) and update (the rest: forward, backward, optimizer), each
boundary synchronised on CUDA. Whole-step ratios on a shared CPU carry several percent of noise, so each run also
times the selection itself from inside the step (wrapping the hook) and reports its share of the step: the overhead
of forking, free of that noise.

Model shapes (`forking_trl.tiny.MODEL_SHAPES`): `tiny` (hidden 128, 4 layers, a 512-token vocabulary), and
`qwen3-0.6b` / `qwen3-1.7b`, Qwen3's published shapes with random weights and its vocabulary of 151,936 rows, so
the logits, the entropy and the memory are at real size. The tokenizer is the tiny one (512 tokens): an id it does
not know decodes to nothing, so rewards read shorter texts; a random model seldom samples the end-of-text token, so
completions run to their length limit (the costly case). On CUDA the model trains in bf16 (TRL's default there),
peak GPU memory is `torch.cuda.max_memory_allocated`; on CPU in float32, peak memory is the resident set.
`--json PATH` writes every figure (the GPU check reads it).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = (
    *("grpo", "grpo_quantile", "forking", "forking_batch", "forking_halfconst", "forking_dynamic"),
    *("branching", "branching_tree"),
)
PARTS = ("generation", "scoring", "update")


def child(variant: str, model: str, steps: int, output_dir: str, device: str, length: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from forking_trl import BranchingGRPOConfig, BranchingGRPOTrainer, ForkingGRPOConfig, ForkingGRPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(64)])

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 5) for c in completions]

    def half_constant(prompts, completions, **kwargs):  # 'What is i + i?': constant for even i
        numbers = [int(p[-1]["content"].split()[2]) for p in prompts]
        return [1.0 if n % 2 == 0 else float(len(c[0]["content"]) % 5) for n, c in zip(numbers, completions)]

    cuda = device == "cuda"
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=16, num_generations=4, max_completion_length=length,
        max_steps=steps, logging_steps=1, learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=not cuda,
        bf16=cuda, seed=0, disable_tqdm=True, loss_type="dapo", beta=0.0,
        model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
    )  # fmt: skip
    if variant == "grpo":
        trainer = GRPOTrainer(model, reward, args=GRPOConfig(**common), train_dataset=data)
    elif variant == "grpo_quantile":
        trainer = GRPOTrainer(model, reward, args=GRPOConfig(top_entropy_quantile=0.2, **common), train_dataset=data)
    elif variant.startswith("branching"):
        credit = "tree" if variant == "branching_tree" else "group"
        args = BranchingGRPOConfig(branching_roots=2, branching_advantage=credit, **common)
        trainer = BranchingGRPOTrainer(model, reward, args=args, train_dataset=data)
    else:
        scope = "batch" if variant == "forking_batch" else "micro_batch"
        dynamic = variant == "forking_dynamic"
        args = ForkingGRPOConfig(
            forking_ratio=0.2, forking_scope=scope, forking_log_top_tokens=0, dynamic_sampling=dynamic, **common
        )
        funcs = half_constant if variant in ("forking_halfconst", "forking_dynamic") else reward
        trainer = ForkingGRPOTrainer(model, funcs, args=args, train_dataset=data)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    spent = {"selection": 0.0, "generation": 0.0, "generate_and_score": 0.0}

    def timed(name, key):  # wrap a bound method of the trainer: seconds spent inside it, synchronised on CUDA
        original = getattr(trainer, name)

        def wrapper(*a, **kw):
            sync()
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                sync()
                spent[key] += time.perf_counter() - start

        setattr(trainer, name, wrapper)

    # time spent in the token selection itself (and batch scope's extra forward), measured inside the step
    hooks = ["get_high_entropy_mask"] if variant == "grpo_quantile" else []
    if variant.startswith("forking"):
        hooks = ["_select_and_record", "_generation_batch_entropies"]
    for name in hooks:
        timed(name, "selection")
    timed("_generate", "generation")
    timed("_generate_and_score_completions", "generate_and_score")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    history = trainer.state.log_history
    times = [e["step_time"] for e in history if "step_time" in e]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rounds = [e["dynamic_sampling/rounds"] for e in history if "dynamic_sampling/rounds" in e] or [1.0]
    if variant == "forking_dynamic":  # informative share of the groups trained on
        key = "dynamic_sampling/filled_groups"
        informative = [1 - e[key] for e in history if key in e]
    else:
        informative = [1 - e["frac_reward_zero_std"] for e in history if "frac_reward_zero_std" in e]
    lengths = [e["completions/mean_length"] for e in history if "completions/mean_length" in e]
    share = [e["branching/generated_tokens_ratio"] for e in history if "branching/generated_tokens_ratio" in e]
    sampled = statistics.mean(length * 16 * (s if share else 1.0) for length, s in zip(lengths, share or lengths))
    total = sum(times)
    split = {  # shares of all the steps' time (the warm-up step included, as in every figure of this split)
        "generation": spent["generation"] / total,
        "scoring": (spent["generate_and_score"] - spent["generation"]) / total,
    }
    split["update"] = max(0.0, 1.0 - split["generation"] - split["scoring"])
    print(json.dumps({"step_time": statistics.median(times[1:]), "peak_mib": peak, "sampled_tokens": sampled,
                      "selection_share": spent["selection"] / total, "rounds": statistics.mean(rounds),
                      "informative": statistics.mean(informative), "split": split}))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps per run, 1 round")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; 3 quick)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all variants (default 3; 1 quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU, bf16")
    parser.add_argument(
        "--model-shape", choices=["tiny", "qwen3-0.6b", "qwen3-1.7b"], default="tiny", help="random model's shape"
    )
    parser.add_argument("--completion-length", type=int, default=64, help="max_completion_length (tokens)")
    parser.add_argument("--model-path", default=None, help="a model built before (build_shaped_model): reused as is")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)} (grpo always)"
    )
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 12)
    if steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    if args.child:
        child(args.child, args.model, steps, args.output_dir, args.device, args.completion_length)
        return
    rounds = args.rounds or (1 if args.quick else 3)
    variants = [v for v in VARIANTS if v == "grpo" or v in args.variants.split(",")]
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False).")

    from forking_trl.tiny import build_shaped_model, pick_threads

    threads, why = pick_threads()  # chosen once: every variant runs in as many threads, so no ratio is biased
    os.environ["OMP_NUM_THREADS"] = str(threads)
    print(f"torch threads of every run: {threads} ({why})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        if args.model_path:
            model = args.model_path
        else:
            model = str(build_shaped_model(os.path.join(tmp, "model"), args.model_shape, dtype=dtype))
            print(f"model {args.model_shape} ({dtype}) built in {time.perf_counter() - started:.0f} s", flush=True)
        results = {v: [] for v in variants}
        for r in range(rounds):
            for variant in variants:
                command = [sys.executable, __file__, "--child", variant, "--model", model, "--steps", str(steps)]
                command += ["--output_dir", os.path.join(tmp, variant), "--device", args.device]
                command += ["--completion-length", str(args.completion_length)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
                results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{rounds}: {variant} {results[variant][-1]['step_time']:.3f} s/step", flush=True)
    report(results, args, rounds, steps)


def report(results: dict, args, rounds: int, steps: int) -> None:
    variants = list(results)
    median = {v: statistics.median(x["step_time"] for x in results[v]) for v in variants}
    base = median["grpo"]
    memory = "peak GPU MiB" if args.device == "cuda" else "peak MiB"
    summary = {"device": args.device, "model_shape": args.model_shape, "rounds": rounds, "timed_steps": steps - 1,
               "completions_per_step": 16, "completion_length": args.completion_length, "variants": {}}  # fmt: skip
    print(
        f"\nStep time, {args.model_shape} on {args.device}, 16 x {args.completion_length}-token completions per step; "
        f"median of {rounds} round(s) x {steps - 1} timed steps"
    )
    print(f"{'variant':>18}{'s / step':>10}{'vs grpo':>9}{memory:>14}{'selection share of step':>25}   split")
    for variant in variants:
        t = median[variant]
        peak = max(x["peak_mib"] for x in results[variant])
        share = statistics.median(x["selection_share"] for x in results[variant])
        split = {p: statistics.median(x["split"][p] for x in results[variant]) for p in PARTS}
        shown = f"{100 * share:.2f}%" if variant != "grpo" and not variant.startswith("branching") else "-"
        parts = " / ".join(f"{100 * split[p]:.0f}%" for p in PARTS)
        print(f"{variant:>18}{t:>10.3f}{t / base:>8.3f}x{peak:>14,.0f}{shown:>25}   {parts}")
        summary["variants"][variant] = {"s_per_step": t, "vs_grpo": t / base, "peak_mib": peak,
                                        "selection_share": share, "split": split}  # fmt: skip
    print("selection share: time inside the selection hook (forking_batch: and its extra forward) / step time")
    print("split: generation / scoring / update, shares of the step time")

    dynamic = [v for v in ("forking_halfconst", "forking_dynamic") if v in variants]
    if dynamic:
        half = median.get("forking_halfconst")  # 'vs without' needs the run without dynamic sampling
        print("\nDynamic sampling, reward constant for half the prompts (same run):")
        print(
            f"{'variant':>18}{'rounds / step':>15}{'s / step':>10}{'vs without':>12}{'informative groups trained':>28}"
        )
        for variant in dynamic:
            rounds_per_step = statistics.mean(x["rounds"] for x in results[variant])
            informative = statistics.mean(x["informative"] for x in results[variant])
            t = median[variant]
            versus = f"{t / half:>11.3f}x" if half else f"{'-':>12}"
            print(f"{variant:>18}{rounds_per_step:>15.2f}{t:>10.3f}{versus}{100 * informative:>27.0f}%")
            summary["variants"][variant].update(rounds_per_step=rounds_per_step, informative=informative)

    branching = [v for v in ("branching", "branching_tree") if v in variants]
    if branching:
        grpo_tokens = statistics.mean(x["sampled_tokens"] for x in results["grpo"])
        print("\nBranching rollouts against independent sampling (grpo), G = 4 completions per prompt (same run):")
        print(f"{'variant':>18}{'tokens sampled / step':>23}{'vs grpo':>9}{'s / step':>10}{'vs grpo':>9}")
        for variant in ("grpo", *branching):
            tokens = statistics.mean(x["sampled_tokens"] for x in results[variant])
            t = median[variant]
            print(f"{variant:>18}{tokens:>23,.0f}{tokens / grpo_tokens:>8.3f}x{t:>10.3f}{t / base:>8.3f}x")
            summary["variants"][variant]["sampled_tokens"] = tokens
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
