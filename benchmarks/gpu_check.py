"""The GPU check in one command: does forking_trl run on this GPU, and what does the forking selection cost at a real
model's shape?

    python benchmarks/gpu_check.py                          # one GPU, within about 8 minutes (make gpu-check)
    python benchmarks/gpu_check.py --smoke                  # the same path at tiny shape on CPU (the suite runs it)
    python benchmarks/gpu_check.py --only bench_entropy,lora --output-dir outputs/gpu_check

Parts, each in its own process with its own time limit, so that one failure loses nothing else:

  bench_step     benchmarks/bench_step.py at the Qwen3-0.6B shape (random weights, bf16): GRPO, forking (micro-batch
                 and batch scope) and branching, step time, peak GPU memory, generation / scoring / update
  bench_entropy  benchmarks/bench_entropy.py: token_entropy, TRL's entropy_from_logits and the naive softmax on
                 8,192 x 151,936 bf16 logits, CUDA events, peak memory, bandwidth against the device's copy bandwidth
  zero3          examples/grpo_math.py for 3 steps under `accelerate launch --config_file accelerate_configs/zero3.yaml
                 --num_processes 1`, the paper's recipe (qwen3_8b_base.yaml, dynamic sampling included) made small
  lora           examples/grpo_math.py for 3 steps under `accelerate_configs/single_gpu.yaml` with the LoRA recipe
                 (qwen3_0.6b_lora.yaml), transformers generation (no vLLM)

Both training parts run on the bundled GSM8K, rewarded by accuracy and `spread_reward` (so that a random model's
advantages, loss and gradients are not all 0), with the same 0.6B-shaped random model, built once here
(`forking_trl.tiny.build_shaped_model`, Qwen3's vocabulary of 151,936; the tokenizer is the tiny one, see
bench_step.py). Everything goes to one folder: each part's log and figures, and `summary.md` / `summary.json` naming
each part, ok or failed (with the end of its log), with its figures, the GPU, and the versions.

`--smoke` runs the same parts at tiny shape on CPU (ZeRO-3 with DS_ACCELERATOR=cpu, `--cpu` for the LoRA launch),
fewer steps, and the bench_step variants behind its other tables (dynamic sampling, branching): the path is tested
where no GPU is. `--smoke --jobs 2` runs two parts at a time, the longest first, each with half the cores (the suite
does: its timings are then not measurements, and on a GPU the parts never share it). Without a GPU and without
`--smoke` it says so and exits 0.
A part's processes end with it (on its time limit too) and with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# with --smoke: dynamic sampling's table and branching's (grpo is always run)
SMOKE_VARIANTS = "forking_dynamic,branching"

PARTS = ("bench_step", "bench_entropy", "zero3", "lora")
# seconds each part may take: the four within about 8 minutes on one GPU, the model's build (about 30 s) aside
LIMITS_S = {"bench_step": 200, "bench_entropy": 60, "zero3": 120, "lora": 90}
SMOKE_LIMITS_S = {"bench_step": 300, "bench_entropy": 120, "zero3": 300, "lora": 300}
# with --smoke --jobs N: the order the parts start in, the longest first (on 2 CPU cores: zero3 about 40 s, bench_step
# 25 s, bench_entropy and lora about 10 s each); the summary keeps the order of --only
SMOKE_START = ("zero3", "bench_step", "lora", "bench_entropy")


def spread_reward(completions, **kwargs) -> list[float]:
    """A reward with spread inside every group (a completion's distinct characters, mod 5), beside accuracy: a random
    model solves nothing, and without it every advantage, loss and gradient of the check would be 0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(set(t)) % 5) for t in texts]


def part_commands(part: str, model: str, out: Path, smoke: bool) -> tuple[list[str], dict]:
    """The command line and extra environment of one part."""
    py = sys.executable
    if part == "bench_step":  # on a GPU the main four; on CPU (the suite's test of the benchmark) its other tables too
        variants = SMOKE_VARIANTS if smoke else "grpo,forking,forking_batch,branching"
        device = ["--device", "cpu", "--model-shape", "tiny"] if smoke else ["--device", "cuda"]
        command = [py, str(ROOT / "benchmarks" / "bench_step.py"), *device, "--model-path", model]
        command += ["--variants", variants, "--rounds", "1", "--steps", "2" if smoke else "4"]
        command += ["--completion-length", "32" if smoke else "128", "--json", str(out / "bench_step.json")]
        return command, {}
    if part == "bench_entropy":
        size = ["--device", "cpu", "--quick", "--repeats", "1"] if smoke else ["--device", "cuda", "--repeats", "5"]
        return [
            py,
            str(ROOT / "benchmarks" / "bench_entropy.py"),
            *size,
            "--json",
            str(out / "bench_entropy.json"),
        ], {}
    launch = [py, "-m", "accelerate.commands.launch"]
    train = [str(ROOT / "examples" / "grpo_math.py"), "--model_name_or_path", model, "--dataset_name", "gsm8k"]
    train += ["--max_train_samples", "64", "--max_steps", "2" if smoke else "3", "--use_vllm", "false"]
    train += ["--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--num_generations", "4"]
    train += ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]
    train += ["--reward_funcs", "accuracy", "benchmarks.gpu_check.spread_reward"]
    train += ["--max_completion_length", "32" if smoke else "128", "--output_dir", str(out / f"{part}_run")]
    on_cpu = ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32"] if smoke else []
    if part == "zero3":
        config = ["--config_file", str(ROOT / "accelerate_configs" / "zero3.yaml"), "--num_processes", "1"]
        config += ["--mixed_precision", "no"] if smoke else []
        recipe = ["--config", str(ROOT / "examples" / "recipes" / "qwen3_8b_base.yaml")]
        # the paper's recipe made small: one generation round of dynamic sampling (it filters on accuracy, and a
        # random model solves nothing: its groups are filled as uninformative, and said so), 16 completions per
        # generation batch
        small = ["--attn_implementation", "sdpa", "--dynamic_sampling_max_rounds", "1"]
        small += ["--generation_batch_size", "16", "--warmup_steps", "0", "--save_steps", "1000"]
        env = {"DS_ACCELERATOR": "cpu"} if smoke else {}
        return [*launch, *config, *train, *recipe, *small, *on_cpu], env
    if part == "lora":
        config = ["--config_file", str(ROOT / "accelerate_configs" / "single_gpu.yaml")]
        config += ["--cpu", "--mixed_precision", "no"] if smoke else []
        recipe = ["--config", str(ROOT / "examples" / "recipes" / "qwen3_0.6b_lora.yaml"), "--save_steps", "1000"]
        return [*launch, *config, *train, *recipe, *on_cpu], {}
    raise ValueError(f"part must be one of {', '.join(PARTS)}; got {part!r}.")


def start_part(part: str, model: str, out: Path, smoke: bool, threads: int | None = None) -> dict:
    """Start one part in its own process tree, its log in `out/<part>.log`; `threads`: its torch threads
    (OMP_NUM_THREADS), where parts share the cores. Started from this thread alone (`preexec_fn` is unsafe in a
    threaded parent)."""
    from forking_trl.ablation.processes import die_with_parent

    command, extra = part_commands(part, model, out, smoke)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    log = open(out / f"{part}.log", "w")  # noqa: SIM115 - closed in finish_part
    log.write("$ " + " ".join(command) + "\n\n")
    log.flush()
    # prctl only, and this process starts no threads
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509
    return {"part": part, "process": process, "log": log, "started": time.perf_counter()}


def finish_part(running: dict, out: Path, limit_s: float, code: int | None) -> dict:
    """The result of a part that ended with `code`, or, with None, reached its time limit (its tree is ended)."""
    from forking_trl.ablation.processes import end_tree

    part, process = running["part"], running["process"]
    if code is None:
        end_tree(process.pid)
        process.wait()
    running["log"].close()
    seconds = time.perf_counter() - running["started"]
    text = (out / f"{part}.log").read_text(errors="replace")
    status = "ok" if code == 0 else "failed"
    result = {"part": part, "status": status, "seconds": round(seconds, 1), "exit_code": code, "limit_s": limit_s}
    if code is None:
        result["reason"] = f"time limit of {limit_s:.0f} s reached"
    elif code:
        result["reason"] = f"exit code {code}"
    if status != "ok":
        result["log_tail"] = text[-2500:]
    result["figures"] = figures(part, out, text)
    return result


def run_parts(parts, model: str, out: Path, smoke: bool, limits: dict, jobs: int = 1, on_result=None) -> dict:
    """Run the parts, `jobs` at a time (the rest wait their turn), each time-boxed; returns their results by part and
    hands each to `on_result` as it ends. Ctrl-C ends every running part's processes with this one."""
    from forking_trl.ablation.processes import end_tree

    threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    waiting, running, results = list(parts), [], {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                part = waiting.pop(0)
                print(f"gpu_check: {part} (at most {limits[part]} s; log: {out / (part + '.log')}) ...", flush=True)
                running.append(start_part(part, model, out, smoke, threads))
            for r in list(running):
                code = r["process"].poll()
                late = time.perf_counter() - r["started"] > limits[r["part"]]
                if code is None and not late:
                    continue
                running.remove(r)
                result = results[r["part"]] = finish_part(r, out, limits[r["part"]], code)
                print(f"gpu_check: {r['part']} {result['status']} in {result['seconds']:.0f} s"
                      f"{' (' + result['reason'] + ')' if 'reason' in result else ''}", flush=True)  # fmt: skip
                if on_result is not None:
                    on_result(results)
            time.sleep(0.1)
    except BaseException:  # Ctrl-C: the parts' processes go with this one
        for r in running:
            end_tree(r["process"].pid)
        raise
    return results


def figures(part: str, out: Path, log: str) -> dict:
    """The figures a part left: its JSON (benchmarks), or what its training logged (the last step's metrics)."""
    path = out / f"{part}.json"
    if path.exists():
        return json.loads(path.read_text())
    import ast
    import re

    metrics = {}
    for line in log.splitlines():  # transformers prints each logging step as a dict
        line = line.strip()
        if line.startswith("{") and ("'loss'" in line or "'train_runtime'" in line):
            try:  # a literal, never code; NaN and inf are not literals: read as None
                metrics.update(ast.literal_eval(re.sub(r"(?<![\w'])-?(nan|inf)(?![\w'])", "None", line)))
            except (ValueError, SyntaxError):  # a line that is not a plain dict is skipped
                continue
    keep = ("train_runtime", "step_time", "loss", "reward", "entropy/p80", "forking/kept_fraction", "grad_norm")
    keep += ("dynamic_sampling/rounds", "dynamic_sampling/filled_groups", "completions/mean_length")
    out = {k: _number(metrics[k]) for k in keep if k in metrics}
    launched = re.search(r"^training on .*$", log, re.M)  # examples/grpo_math.py's line: processes, backend, device
    if launched:
        out["launch"] = launched.group(0).removeprefix("training on ")
    return out


def _number(value):
    """transformers prints its logged floats as strings ('0.5568'): back to numbers where they are."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "peft", "deepspeed", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - a missing package is reported, not fatal
            versions[name] = f"missing ({type(err).__name__})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "gpu": gpu, "cuda": torch.version.cuda, "versions": versions}


def summary_markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        f"# GPU check{' (smoke: tiny shape, CPU)' if summary['smoke'] else ''}",
        "",
        f"{env['date']}; GPU: {env['gpu'] or 'none'}; CUDA {env['cuda']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"Model: {summary['model_shape']} (random weights), built in {summary['model_seconds']:.0f} s.",
        "",
        "| part | status | seconds | figures |",
        "|---|---|---:|---|",
    ]
    for r in summary["parts"]:
        lines.append(f"| {r['part']} | {r['status']}{' (' + r['reason'] + ')' if 'reason' in r else ''} | "
                     f"{r['seconds']:.0f} | {_figures_cell(r)} |")  # fmt: skip
    for r in summary["parts"]:
        if r["status"] != "ok":
            lines += ["", f"## {r['part']}: the end of its log", "", "```", r["log_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def _figures_cell(r: dict) -> str:
    f = r["figures"]
    if r["part"] == "bench_step" and "variants" in f:
        return "; ".join(
            f"{v}: {x['s_per_step']:.3f} s/step ({x['vs_grpo']:.2f}x), {x['peak_mib']:,.0f} MiB, gen/score/update "
            + "/".join(f"{100 * x['split'][p]:.0f}" for p in ("generation", "scoring", "update"))
            + "%"
            for v, x in f["variants"].items()
        )
    if r["part"] == "bench_entropy" and "methods" in f:
        cells = []
        for name, x in f["methods"].items():
            if "error" in x:
                cells.append(f"{name}: failed")
                continue
            cell = f"{name}: {1000 * x['seconds']:.1f} ms, {x['peak_mib']:,.0f} MiB, err {x['max_abs_err_first8']:.0e}"
            if "read_gbps" in x:
                cell += f", {x['read_gbps']:,.0f} GB/s ({100 * x['read_gbps'] / x['copy_gbps']:.0f}% of copy)"
            cells.append(cell)
        return "; ".join(cells)
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU: the same path, no GPU needed")
    parser.add_argument("--output-dir", default="outputs/gpu_check", help="where the logs, figures and summary go")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts, from {', '.join(PARTS)}")
    parser.add_argument(
        "--model-shape", default=None, help="qwen3-0.6b (default on GPU), qwen3-1.7b; tiny with --smoke"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="with --smoke: parts run at a time (each with its share of the cores)"
    )
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.jobs < 1 or (args.jobs > 1 and not args.smoke):
        parser.error(
            f"--jobs must be 1, or more with --smoke only (on a GPU the parts are timed alone); got {args.jobs}"
        )
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible here, so there is nothing to check; `--smoke` runs the same path "
              "at tiny shape on CPU.")  # fmt: skip
        return 0
    from forking_trl.tiny import build_shaped_model

    shape = args.model_shape or ("tiny" if args.smoke else "qwen3-0.6b")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: building the {shape} model (random weights) ...", flush=True)
    started = time.perf_counter()
    model = str(build_shaped_model(out / f"model-{shape}", shape, dtype="float32" if args.smoke else "bfloat16"))
    model_seconds = time.perf_counter() - started
    limits = SMOKE_LIMITS_S if args.smoke else LIMITS_S
    summary = {"smoke": args.smoke, "model_shape": shape, "model_seconds": model_seconds, "parts": []}
    summary["environment"] = environment()
    order = parts if args.jobs == 1 else sorted(parts, key=SMOKE_START.index)  # several at a time: longest first

    def record(results: dict) -> None:  # after every part: a kill loses none
        summary["parts"] = [results[p] for p in parts if p in results]
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(summary_markdown(summary))

    run_parts(order, model, out, args.smoke, limits, args.jobs, on_result=record)
    print(f"\n{summary_markdown(summary)}\nwritten: {out / 'summary.md'}, {out / 'summary.json'}")
    return 0 if all(r["status"] == "ok" for r in summary["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
