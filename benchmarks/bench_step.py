"""Training-step time and peak memory on a tiny Qwen3, CPU: forking vs plain GRPO.

    python benchmarks/bench_step.py            # 12 steps per run, 3 rounds
    python benchmarks/bench_step.py --quick    # 3 steps, 1 round (the test suite runs this)

Variants (same model, data, seed and batch: 16 completions of 64 tokens per step):
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

Each run is its own child process (so its peak resident memory is its own), the variants alternate within each
round, and the figure is the median over rounds of each run's median `step_time` (TRL's metric: generation,
scoring and the optimizer step), the first step left out as warm-up. Ratios are to `grpo`, measured in this run.
Whole-step ratios on a shared CPU carry several percent of noise, so each run also times the selection itself from
inside the step (wrapping the hook) and reports its share of the step: the overhead of forking, free of that noise.
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


def child(variant: str, model: str, steps: int, output_dir: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from forking_trl import BranchingGRPOConfig, BranchingGRPOTrainer, ForkingGRPOConfig, ForkingGRPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(64)])

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 5) for c in completions]

    def half_constant(prompts, completions, **kwargs):  # 'What is i + i?': constant for even i
        numbers = [int(p[-1]["content"].split()[2]) for p in prompts]
        return [1.0 if n % 2 == 0 else float(len(c[0]["content"]) % 5) for n, c in zip(numbers, completions)]

    common = dict(
        output_dir=output_dir, per_device_train_batch_size=16, num_generations=4, max_completion_length=64,
        max_steps=steps, logging_steps=1, learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, disable_tqdm=True, loss_type="dapo", beta=0.0,
    )
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
    # time spent in the token selection itself (and batch scope's extra forward), measured inside the step
    spent = [0.0]
    hooks = ["get_high_entropy_mask"] if variant == "grpo_quantile" else []
    if variant.startswith("forking"):
        hooks = ["_select_and_record", "_generation_batch_entropies"]
    for name in hooks:
        original = getattr(trainer, name)

        def timed(*a, _original=original, **kw):
            start = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(trainer, name, timed)
    trainer.train()
    history = trainer.state.log_history
    times = [e["step_time"] for e in history if "step_time" in e]
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
    print(json.dumps({"step_time": statistics.median(times[1:]), "peak_mib": peak, "sampled_tokens": sampled,
                      "selection_share": spent[0] / sum(times), "rounds": statistics.mean(rounds),
                      "informative": statistics.mean(informative)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; 3 quick)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all variants (default 3; 1 quick)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 12)
    if args.child:
        child(args.child, args.model, steps, args.output_dir)
        return
    rounds = args.rounds or (1 if args.quick else 3)

    from forking_trl.tiny import build_tiny_model, pick_threads

    threads, why = pick_threads()  # chosen once: every variant runs in as many threads, so no ratio is biased
    os.environ["OMP_NUM_THREADS"] = str(threads)
    print(f"torch threads of every run: {threads} ({why})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_model(os.path.join(tmp, "model"), hidden_size=128, num_layers=4))
        results = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for variant in VARIANTS:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--model", model, "--steps", str(steps),
                     "--output_dir", os.path.join(tmp, variant)],
                    capture_output=True, text=True,
                )
                if done.returncode != 0:
                    raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
                results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{rounds}: {variant} {results[variant][-1]['step_time']:.3f} s/step", flush=True)

    base = statistics.median(x["step_time"] for x in results["grpo"])
    print(f"\nStep time, tiny Qwen3 (hidden 128, 4 layers), 16 x 64-token completions per step, CPU; "
          f"median of {rounds} round(s) x {steps - 1} timed steps")
    print(f"{'variant':>18}{'s / step':>10}{'vs grpo':>9}{'peak MiB':>10}{'selection share of step':>25}")
    for variant in VARIANTS:
        t = statistics.median(x["step_time"] for x in results[variant])
        peak = max(x["peak_mib"] for x in results[variant])
        share = statistics.median(x["selection_share"] for x in results[variant])
        shown = f"{100 * share:.2f}%" if variant != "grpo" and not variant.startswith("branching") else "-"
        print(f"{variant:>18}{t:>10.3f}{t / base:>8.3f}x{peak:>10,.0f}{shown:>25}")
    print("selection share: time inside the selection hook (forking_batch: and its extra forward) / step time")

    half = statistics.median(x["step_time"] for x in results["forking_halfconst"])
    dyn = statistics.median(x["step_time"] for x in results["forking_dynamic"])
    print("\nDynamic sampling, reward constant for half the prompts (same run):")
    print(f"{'variant':>18}{'rounds / step':>15}{'s / step':>10}{'vs without':>12}{'informative groups trained':>28}")
    for variant, t in (("forking_halfconst", half), ("forking_dynamic", dyn)):
        rounds = statistics.mean(x["rounds"] for x in results[variant])
        informative = statistics.mean(x["informative"] for x in results[variant])
        print(f"{variant:>18}{rounds:>15.2f}{t:>10.3f}{t / half:>11.3f}x{100 * informative:>27.0f}%")


    grpo_tokens = statistics.mean(x["sampled_tokens"] for x in results["grpo"])
    print("\nBranching rollouts against independent sampling (grpo), G = 4 completions per prompt (same run):")
    print(f"{'variant':>18}{'tokens sampled / step':>23}{'vs grpo':>9}{'s / step':>10}{'vs grpo':>9}")
    for variant in ("grpo", "branching", "branching_tree"):
        tokens = statistics.mean(x["sampled_tokens"] for x in results[variant])
        t = statistics.median(x["step_time"] for x in results[variant])
        print(f"{variant:>18}{tokens:>23,.0f}{tokens / grpo_tokens:>8.3f}x{t:>10.3f}{t / base:>8.3f}x")


if __name__ == "__main__":
    main()
