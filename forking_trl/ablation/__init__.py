"""The experiment runner: the paper's three findings in miniature (entropy pattern, overlap after RL, the
token-selection ablation), and any comparison of named arms x seeds from one start model.

`examples/ablation.py` is the command; this package does the work, one module per stage, so that a test can call
each piece:

- `arguments`: what the experiment compares (arms: the paper's `all`, `top` 0.2, `bottom` 0.8, `random` 0.2, the
  entropy methods on all tokens at their defaults, and any a recipe defines in `arm_configs`), how it measures, where
  its jobs run; every arm's command line is parsed and validated before anything trains.
- `start`: the task's data and the start model (the tiny offline Qwen3 warm-started in one torch thread, shipped in
  `bundled_data/start_model` for the CPU recipes' settings; or any model path), its checksum, and `measure`:
  held-out accuracy (greedy, sampled avg@k), pass@k, the entropy pattern, the overlap of the top-20% entropy
  positions with the start model's on its completions (teacher forced).
- `runs`: one (arm, seed) run as a job: train from the start model and measure (`run_job`; on several processes
  through `accelerate launch`); `processes`: such a run's processes end with its job, however it ends.
- `jobs`: the runs through submitit (`launcher`: `local`, `slurm`, `debug`), resume, failures isolated, progress.
- `report`: summaries over seeds, `results.md` (tables, verdicts); a measure is one entry of `report.MEASURES` (or
  `report.CURVES` for one at several k) and appears in the table, the verdicts and the plots. `plots`: the figures.
  `write_results` (here) writes `results.json`, `results.md` and the figures.

Outputs: `results.json`, `results.md`, `accuracy.png`, `entropy_training.png`, `pass_at_k.png` and `exploration.png`
(with pass@k: pass@1 against exploration, one dot per run), `coverage.png` (a task with several solutions),
`start_entropy_histogram.png`, `start_tokens.html`; `runs/<arm>-seed<seed>/` (each run's spec, result and model)
and `jobs/` (submitit's logs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from .arguments import (
    ARM_BASE,
    ARMS,
    BUNDLED_START_MODELS,
    PAPER_ARMS,
    QUICK_FLAGS,
    START_SETTINGS,
    TRACKED,
    AblationArguments,
    arm_flags,
    check_arms,
    make_parser,
    parse_run,
    run_flags,
    shipped_start_model,
    start_settings,
    unset_fields,
)
from .jobs import (
    LAUNCHERS,
    cached_result,
    environment,
    gpu_slots,
    job_environment,
    least_busy,
    make_executor,
    run_jobs,
    spec_key,
)
from .plots import plot_accuracy, plot_curve, plot_entropy_training, plot_exploration
from .report import CURVES, MEASURES, Curve, Measure, merge_reports, results_markdown, verdicts
from .runs import run_arm, run_job, run_spec, write_result
from .start import measure, model_checksum, sft_warm_start, start_model, task_data

__all__ = [
    "ARMS",
    "ARM_BASE",
    "AblationArguments",
    "BUNDLED_START_MODELS",
    "CURVES",
    "Curve",
    "LAUNCHERS",
    "MEASURES",
    "Measure",
    "PAPER_ARMS",
    "QUICK_FLAGS",
    "RunsFailed",
    "START_SETTINGS",
    "TRACKED",
    "arm_flags",
    "cached_result",
    "check_arms",
    "gpu_slots",
    "job_environment",
    "least_busy",
    "make_executor",
    "make_parser",
    "measure",
    "model_checksum",
    "parse_run",
    "plot_accuracy",
    "plot_curve",
    "plot_entropy_training",
    "plot_exploration",
    "results_markdown",
    "run_ablation",
    "run_arm",
    "run_flags",
    "run_job",
    "run_jobs",
    "run_spec",
    "sft_warm_start",
    "shipped_start_model",
    "spec_key",
    "start_model",
    "start_settings",
    "task_data",
    "unset_fields",
    "verdicts",
    "write_result",
    "write_results",
    "merge_reports",
    "merge_results",
]


class RunsFailed(RuntimeError):
    """Some runs failed; the results of those that finished are written (and name the failed ones)."""


def write_results(report: dict, out: Path) -> None:
    """results.json, results.md, accuracy.png, entropy_training.png, and a plot per curve the start has."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(results_markdown(report))
    plot_accuracy(report, out / "accuracy.png")
    plot_entropy_training(report, out / "entropy_training.png")
    for curve in CURVES:
        if curve.key in report["start"]:
            plot_curve(report, curve, out / f"{curve.key}.png")
    if "pass_at_k" in report["start"]:
        plot_exploration(report, out / "exploration.png")


# what the start model's measurement depends on, beside the model (its checksum) and the held-out rows
MEASURE_FIELDS = ("eval_k", "eval_max_new_tokens", "eval_batch_size", "pass_k", "pass_k_problems", "threads_per_run")


def _measured_start(ab, out: Path, held: list[dict], model_path: str, checksum: str):
    """(measurement, samples, scored) of the start model: from `out/start.json` when it was written for the same
    model, held-out rows and measurement settings (a resumed experiment does not measure it again: minutes for a
    real model on CPU), else measured now and written there (the runs read its samples for the overlap)."""
    from ..analysis import ScoredCompletion
    from ..tiny import torch_threads

    key = {"checksum": checksum, "held": _digest(held), **{f: getattr(ab, f) for f in MEASURE_FIELDS}}
    path = out / "start.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            print(f"start model: {model_path}; its measurement in {path} is reused (same model and settings)")
            return saved["measurement"], saved["samples"], [ScoredCompletion(**s) for s in saved["scored"]]
    print(f"start model: {model_path}; measuring it on {len(held)} held-out problems", flush=True)
    with torch_threads(ab.threads_per_run):  # as each run measures itself: the same numbers on any core count
        start, ev, scored = measure(model_path, ab, held)
    record = {"key": key, "measurement": start, "samples": ev.samples}
    record["scored"] = [dataclasses.asdict(s) for s in scored]
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record, ensure_ascii=False))
    partial.replace(path)  # whole or absent: a run never reads half a file
    return start, ev.samples, scored


def _digest(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def merge_results(paths: list[str], out: str | Path) -> dict:
    """Merge the `results.json` of several commands of one experiment (`report.merge_reports`: refused, naming what
    differs, when they are not) into one report in `out`: results.json, results.md and the figures."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable results.json ({err}).") from err
    command = "python examples/ablation.py merge --output_dir " + " ".join(map(str, [out, *paths]))
    report = merge_reports(reports, command)
    write_results(report, Path(out))
    return {**report, "output_dir": str(out)}


def run_ablation(argv: list[str]) -> dict:
    """Run every stage of the experiment given by a command line (`--config recipe.yaml`, flags, `--output_dir`):
    validate every arm, build (or reuse) the start model and measure it, run the arms x seeds as jobs (resuming
    those already done), write the results of the runs that finished; `RunsFailed` at the end names the others."""
    from tqdm.auto import tqdm

    from ..analysis import plot_histogram, write_html
    from .report import _arm_summary, _exploration_text, _start_line, _top_threshold

    started = time.time()
    ab, training_args = make_parser().parse_args_and_config(argv)
    out = Path(training_args.output_dir)
    check_arms(ab, argv, out)  # every arm's command line parses and validates, before anything trains
    out.mkdir(parents=True, exist_ok=True)
    train, held = task_data(ab)
    model_path = start_model(ab, out, train)
    checksum = model_checksum(model_path)
    start, _, scored = _measured_start(ab, out, held, model_path, checksum)
    summary = {**start["entropy"], "top_ratio": 0.2}
    plot_histogram(scored, {**summary, "top_threshold": _top_threshold(scored)}, out / "start_entropy_histogram.png")
    write_html(scored, {**summary, "top_threshold": _top_threshold(scored)}, out / "start_tokens.html", 12)
    print(_start_line(start), flush=True)

    runs = [(arm, seed) for seed in ab.seeds for arm in ab.arms]  # seed-major: early results cover every arm
    specs = [run_spec(ab, argv, arm, seed, out, model_path, checksum) for arm, seed in runs]
    bar = tqdm(total=len(runs), desc=f"runs (arm x seed, {ab.launcher})")

    def report_line(finished, done: int, total: int, eta_s: float | None) -> None:
        bar.update(1)
        spec, result = finished.spec, finished.result
        left = f"; {done}/{total} trained"
        if eta_s is not None and done < total:
            left += f", about {eta_s:.0f} s left" if eta_s < 90 else f", about {eta_s / 60:.0f} min left"
        if result is None:
            bar.write(
                f"{spec['arm']:>6} seed {spec['seed']}: FAILED ({finished.error.splitlines()[0][:200]}); the other "
                f"runs go on{left}\n{finished.log}"
            )
            return
        acc = result["accuracy"]
        bar.write(
            f"{spec['arm']:>6} seed {spec['seed']}: greedy {100 * acc['greedy']:5.1f}%  avg@{acc['k']} "
            f"{100 * acc['sampled']:5.1f}%  overlap {100 * result['overlap']['overlap']:5.1f}%"
            f"{_exploration_text(result)}  ({result['train_seconds']:.0f} s){left}"
        )

    with environment(job_environment(ab.threads_per_run)):
        outcomes = run_jobs(specs, ab, out, run_job, report_line)
    bar.update(sum(o.cached for o in outcomes))  # the runs resumed from an earlier command
    bar.close()
    results: dict[str, list[dict]] = {arm: [] for arm in ab.arms}
    failed = []
    for outcome in outcomes:
        if outcome.result is not None:
            results[outcome.spec["arm"]].append(outcome.result)
        else:
            spec = outcome.spec
            failed.append(
                {"arm": spec["arm"], "seed": spec["seed"], "error": outcome.error, "output_dir": spec["output_dir"]}
            )
    report = {
        "command": "python examples/ablation.py " + " ".join(argv),
        "ablation": dataclasses.asdict(ab),
        "arm_fields": {arm: ab.arm_fields(arm) for arm in ab.arms},
        "training": {
            k: getattr(training_args, k)
            for k in ("learning_rate", "max_steps", "per_device_train_batch_size", "num_generations", "loss_type")
            + ("beta", "epsilon", "epsilon_high", "temperature", "max_completion_length", "generation_batch_size")
        },
        "start": start,
        "start_checksum": checksum,
        "arms": {arm: _arm_summary(results[arm]) for arm in ab.arms if results[arm]},
        "failed_runs": failed,
        "wall_seconds": round(time.time() - started, 1),
    }
    write_results(report, out)
    if failed:
        names = ", ".join(f"{f['arm']} seed {f['seed']}" for f in failed)
        raise RunsFailed(
            f"{len(failed)} of {len(runs)} runs failed: {names}. The results of the {len(runs) - len(failed)} that "
            f"finished are in {out / 'results.md'}; rerunning the command trains only the runs without a result."
        )
    return {**report, "output_dir": str(out)}
