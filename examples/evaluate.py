"""avg@k and pass@k on the bundled benchmarks (AIME'24, AIME'25, AMC'23, MATH-500, Minerva, OlympiadBench), or on the
held-out split of a generated task (`chain`, `countdown`: with the coverage of each problem's solutions).

    python examples/evaluate.py --model Qwen/Qwen3-8B-Base --k 16 --max_new_tokens 20480
    python examples/evaluate.py --model outputs/demo/tiny-sft --benchmarks aime24 --limit 4 --k 2 --max_new_tokens 16

pass@k for k = 1, 2, 4, ..., N from N samples per problem (the unbiased estimator of Chen et al. 2021):

    python examples/evaluate.py --model M --benchmarks aime24 aime25 --pass_k 64 --max_new_tokens 8192

The held-out problems of an experiment's recipe (its task, its settings, its split: what the runner measures), e.g.
Countdown with the coverage of each problem's solutions:

    python examples/evaluate.py --model outputs/explore/runs/top-seed0/final \
        --recipe examples/recipes/explore_countdown_cpu.yaml --pass_k 64 --max_new_tokens 48

The paper's decoding experiment (higher temperature on forking tokens) is one flag away:

    python examples/evaluate.py --model M --forking_threshold 0.672 --high_temperature 1.2 --low_temperature 1.0

Generation uses vLLM when it is installed and no forking temperature is asked for, transformers `generate` otherwise.
The grading is the task's (`forking_trl.tasks`: math-verify's `accuracy_reward` for the benchmarks, `countdown_reward`
for Countdown); transformers generation is `forking_trl.evaluation.generate`, shared with the ablation. Writes a JSON
file and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from forking_trl.data import BENCHMARKS  # noqa: E402
from forking_trl.evaluation import MATH, pass_at_k_ks, score_samples  # noqa: E402
from forking_trl.models import resolve_model  # noqa: E402
from forking_trl.tasks import GENERATED, MathDataset, Task, get_task  # noqa: E402
from forking_trl.templates import check_template, needs_plain_prompts, prompt_text  # noqa: E402


def benchmark(name: str, limit: int | None, recipe: str | None = None) -> tuple[Task, list[dict]]:
    """(task, rows) of a benchmark: a bundled name or file (a math dataset, in order, the first `limit` problems),
    a generated task's held-out split at its default settings (`limit` problems, 200 by default), or with `recipe`
    the held-out split of that experiment recipe's task (the runner's `num_eval` problems, or the first `limit`)."""
    if recipe is not None:
        from forking_trl.ablation import make_parser, task_data

        ab, _ = make_parser().parse_args_and_config(["--config", recipe, "--output_dir", "unused"])
        held = task_data(ab)[1]
        return ab.make_task(), held[:limit] if limit else held
    if name in GENERATED:
        task = get_task(name)
        return task, task.split(20000, limit or 200)[1]  # the runner's default training set is held out from
    task = MathDataset(name)
    return task, task.load(limit)


def transformers_generator(model_path, args):
    """Load the model once; return `generate(prompts) -> k completions per prompt`."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from forking_trl import ForkingTemperatureLogitsProcessor
    from forking_trl.evaluation import generate as forking_generate

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    processors = LogitsProcessorList()
    temperature = args.temperature
    if args.forking_threshold is not None:
        processors.append(
            ForkingTemperatureLogitsProcessor(args.forking_threshold, args.high_temperature, args.low_temperature)
        )
        temperature = 1.0  # the processor applies the temperatures

    def generate(prompts):
        with tqdm(total=len(prompts), desc="generate") as bar:
            ids = forking_generate(
                model,
                tokenizer,
                [prompt_text(tokenizer, p, args.prompt_template) for p in prompts],
                num_return_sequences=args.num_samples,
                temperature=temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                logits_processor=processors,
                progress=bar,
            )
        return [[tokenizer.decode(x, skip_special_tokens=True) for x in group] for group in ids]

    return generate


def vllm_generator(model_path, args):
    """Load the engine once; return `generate(prompts) -> k completions per prompt`."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype=args.dtype)
    params = SamplingParams(
        n=args.num_samples, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens
    )
    tokenizer = llm.get_tokenizer()

    def generate(prompts):
        if needs_plain_prompts(tokenizer, args.prompt_template):  # a base model, or a template chosen
            texts = [prompt_text(tokenizer, p, args.prompt_template) for p in prompts]
            return [[o.text for o in r.outputs] for r in llm.generate(texts, params)]
        return [[o.text for o in r.outputs] for r in llm.chat(prompts, params)]

    return generate


def score_benchmark(samples: list[list[str]], rows: list[dict], k: int, pass_k: int, task: Task = MATH) -> dict:
    """avg@k over the first `k` samples of each problem, and with `pass_k` pass@k for k = 1, 2, 4, ..., pass_k
    estimated from all the samples drawn (n = max(k, pass_k), the number counted), with the coverage of the
    solutions for a task that has several (Countdown); ungradable problems left out. Every sample is graded once,
    by the task (`forking_trl.tasks`)."""
    graded = [task.grade(group, [row] * len(group)) for group, row in zip(samples, rows, strict=True)]
    avg = []
    for grades in graded:
        first = [r for r in grades[:k] if r is not None]  # None: nothing to grade against
        if first:
            avg.append(sum(first) / len(first))
    result = {"avg@k": sum(avg) / len(avg) if avg else None, "k": k, "problems": len(avg)}
    if pass_k:
        n = {len(group) for group in samples}
        if len(n) > 1 or min(n, default=pass_k) < pass_k:
            raise ValueError(f"pass@k needs the same number (>= pass_k={pass_k}) of samples per problem; got {n}.")
        scored = score_samples(samples, rows, task, pass_at_k_ks(pass_k), graded)  # n: every sample counted
        result["pass@k"] = scored["pass_at_k"]
        result["pass@k_n"] = scored["n"]
        for key in ("coverage", "answers"):
            if key in scored:
                result[key] = scored[key]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        required=True,
        help="model folder, Hub id, .gguf file, or a real model's name: smollm2-135m-instruct, gemma-3-270m",
    )
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=list(BENCHMARKS),
        help=f"any of {', '.join(BENCHMARKS)}, files, or a generated task's held-out split: {', '.join(GENERATED)}",
    )
    parser.add_argument("--k", type=int, default=4, help="samples per problem (avg@k)")
    parser.add_argument(
        "--pass_k",
        type=int,
        default=0,
        help="samples per problem for pass@k at k = 1, 2, 4, ..., pass_k (unbiased estimator); 0: off. avg@k is "
        "then taken from the first k of them",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="an experiment recipe (examples/recipes/*.yaml): evaluate on its task's held-out split instead of "
        "--benchmarks",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--max_new_tokens", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (transformers)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument(
        "--forking_threshold", type=float, default=None, help="entropy (nats) at or above which a position is a fork"
    )
    parser.add_argument("--high_temperature", type=float, default=1.0, help="temperature at forking positions")
    parser.add_argument("--low_temperature", type=float, default=1.0, help="temperature elsewhere")
    parser.add_argument(
        "--prompt_template",
        default=None,
        help="plain prompt template with one {prompt}, e.g. 'Question: {prompt}\\nAnswer:'; default: the "
        "tokenizer's chat template, or that plain one for a model without a chat template (a base model)",
    )
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--output", default="outputs/eval.json")
    args = parser.parse_args()
    if args.k < 1 or args.pass_k < 0:
        parser.error(f"--k must be >= 1 and --pass_k >= 0; got {args.k} and {args.pass_k}")
    args.num_samples = max(args.k, args.pass_k)
    try:
        check_template(args.prompt_template, "--prompt_template")
    except ValueError as err:
        parser.error(str(err))

    backend = args.backend
    if backend == "auto":
        try:
            import vllm  # noqa: F401

            backend = "vllm" if args.forking_threshold is None else "transformers"
        except ImportError:
            backend = "transformers"

    model = args.model
    args.model = resolve_model(args.model)  # a real model's name or a .gguf file: a plain cached checkpoint
    results, started = {}, time.time()
    generate = (vllm_generator if backend == "vllm" else transformers_generator)(args.model, args)
    for name in [f"{Path(args.recipe).stem} (held out)"] if args.recipe else args.benchmarks:
        task, rows = benchmark(
            name, args.limit, args.recipe
        )  # math: the instruction is added only where the problem lacks one
        results[name] = score_benchmark(generate([row["prompt"] for row in rows]), rows, args.k, args.pass_k, task)

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model,
        "model_path": args.model,
        "backend": backend,
        "seconds": round(time.time() - started, 1),
        "args": vars(args),
        "results": results,
    }
    Path(args.output).write_text(json.dumps(report, indent=2))
    ks = list(next(iter(results.values())).get("pass@k", {})) if results else []
    width = max(16, *(len(name) + 2 for name in results))
    print(
        f"\n{'benchmark':<{width}}{'avg@' + str(args.k):>10}{'problems':>10}"
        + "".join(f"{'pass@' + k:>10}" for k in ks)
    )
    for name, r in results.items():
        value = f"{100 * r['avg@k']:.1f}" if r["avg@k"] is not None else "-"
        passes = "".join(f"{100 * r['pass@k'][k]:>10.1f}" for k in ks)
        print(f"{name:<{width}}{value:>10}{r['problems']:>10}{passes}")
        if "coverage" in r:
            c = r["coverage"]
            print(
                f"{'':<{width}}distinct correct solutions found among k samples (coverage@k): "
                + ", ".join(f"k={k} {v:.2f}" for k, v in c["coverage_at_k"].items())
                + f"; the problems have {c['solutions_per_problem']:.2f} on average"
            )
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
