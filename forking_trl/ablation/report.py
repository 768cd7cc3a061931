"""The report of an experiment, as text: what is measured (`MEASURES`) and drawn as curves (`CURVES`), summaries
over seeds, `results.md` (tables and verdicts). The figures are `plots`; `write_results` (in the package) writes both.

Plain functions of the report dict, so that a test can call them on a small hand-made one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass


def _top_threshold(scored) -> float:
    import torch

    from ..selection import forking_mask

    values = torch.tensor([h for s in scored for h in s.entropies])
    return float(values[forking_mask(values, torch.ones_like(values, dtype=torch.bool), ratio=0.2)].min())


def _start_line(start: dict) -> str:
    acc, ent = start["accuracy"], start["entropy"]
    p = ent["percentiles"]
    return (
        f"start: greedy {100 * acc['greedy']:.1f}%, avg@{acc['k']} {100 * acc['sampled']:.1f}%; "
        f"{100 * ent['share_below_0.01']:.1f}% of tokens below 0.01 nats; p50 {p['p50']:.3f}, p80 {p['p80']:.3f}, "
        f"p95 {p['p95']:.3f} nats" + _exploration_text(start)
    )


def _exploration_text(result: dict) -> str:
    """pass@k at the largest k, and coverage there, of a result that has them ('' otherwise)."""
    out = ""
    if "pass_at_k" in result:
        k, v = list(result["pass_at_k"]["pass_at_k"].items())[-1]
        out += f"; pass@{k} {100 * v:.1f}%"
    if "coverage" in result:
        c = result["coverage"]
        k, v = list(c["coverage_at_k"].items())[-1]
        out += f", coverage@{k} {v:.2f} of {c['solutions_per_problem']:.2f} solutions per problem"
    return out


@dataclass(frozen=True)
class Measure:
    """One number per run, summarised over seeds per arm: a column of the table (with the gain over the start model
    when the start has it), a verdict against `all`, a panel of `accuracy.png`. A new measure is one entry of
    `MEASURES`, and it shows up in all three."""

    key: str  # in each arm's summary
    header: str  # the table's column ("{k}": the avg@k sample count)
    of_run: Callable[[dict], float | None]  # from one run's result
    of_start: Callable[[dict], float | None] | None = None  # from the start model's measurement: a gain column
    verdict: str | None = None  # its name in the verdicts (None: no verdict)
    plot: str | None = None  # its panel's title in accuracy.png (None: no panel)
    percent: bool = True  # a share, shown in %, differences in points; else shown as is (`digits` decimals)
    digits: int = 2
    optional: bool = False  # only some runs have it (answers: a task with several solutions; generated tokens)

    def shown(self, report: dict) -> bool:
        """An optional measure that no run has is left out of the report."""
        return not self.optional or any(a.get(self.key, {}).get("n", 0) > 0 for a in report["arms"].values())

    def text(self, stat: dict) -> str:
        return _stat(stat, self.percent, self.digits)


def _median_step_time(history: list[dict]) -> float | None:
    """Median of TRL's `step_time` over a run's steps, the first (warm-up) left out when there are others."""
    times = [h["step_time"] for h in history if "step_time" in h]
    return statistics.median(times[1:] or times) if times else None


def _answers(key: str) -> Callable[[dict], float | None]:
    return lambda r: r.get("answers", {}).get(key)


MEASURES = (
    Measure(
        "greedy",
        "greedy %",
        lambda r: r["accuracy"]["greedy"],
        lambda s: s["accuracy"]["greedy"],
        verdict="greedy",
        plot="greedy",
    ),
    Measure(
        "sampled",
        "avg@{k} %",
        lambda r: r["accuracy"]["sampled"],
        lambda s: s["accuracy"]["sampled"],
        verdict="avg@k",
        plot="avg@{k} at T = 1",
    ),
    Measure("overlap", "overlap %", lambda r: r["overlap"]["overlap"]),
    Measure("below_0.01", "tokens < 0.01 nats after %", lambda r: r["entropy"]["share_below_0.01"]),
    # a task with several solutions per problem: the answers of the pass@k samples (forking_trl.tasks.answer_diversity)
    Measure(
        "distinct_answers",
        "distinct answers / problem",
        _answers("distinct_answers"),
        _answers("distinct_answers"),
        verdict="distinct answers",
        percent=False,
        optional=True,
    ),
    Measure(
        "answer_entropy",
        "answer entropy (nats)",
        _answers("answer_entropy"),
        _answers("answer_entropy"),
        verdict="answer entropy",
        percent=False,
        optional=True,
    ),
    Measure(
        "step_seconds",
        "s / step",
        lambda r: _median_step_time(r.get("history", [])),
        percent=False,
        digits=1,
        optional=True,
    ),
    Measure(
        "generated_tokens",
        "generated tokens (M)",
        lambda r: None if r.get("generated_tokens") is None else r["generated_tokens"] / 1e6,
        percent=False,
        digits=3,
        optional=True,
    ),
)


@dataclass(frozen=True)
class Curve:
    """A measure at several k (pass@k, ...): a table of its own with the start model's row, verdicts at the first and
    the last k, a plot against k. `of_run` gives `{"n", "num_problems", <values_key>: {k: value}}` or None."""

    key: str  # in each arm's summary, and the result key of each run and of the start
    values_key: str
    label: str  # "pass@{k}"
    description: str  # the table's caption (formatted with the start's entry of the curve)
    percent: bool = True  # a share of problems, shown in %; else a number (coverage: solutions)
    unit: str = "% of problems"  # the plot's axis

    def text(self, stat: dict) -> str:
        return _stat(stat, self.percent, 2)


CURVES = (
    Curve(
        "pass_at_k",
        "pass_at_k",
        "pass@{k}",
        "pass@k at T = 1 on {num_problems} held-out problems, {n} samples each (unbiased estimator), mean ± standard "
        "deviation over seeds:",
    ),
    Curve(
        "coverage",
        "coverage_at_k",
        "coverage@{k}",
        "coverage@k, the expected number of distinct correct solutions among k samples at T = 1 (distinct: the "
        "expression up to the commutativity of + and ×; unbiased, from {n} samples each), on {num_problems} held-out "
        "problems with {solutions_per_problem:.2f} solutions each on average; mean ± standard deviation over seeds:",
        percent=False,
        unit="distinct correct solutions",
    ),
)


def _stat(stat: dict, percent: bool, digits: int) -> str:
    if percent:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _mean_std(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(finite), "values": values}


def _arm_summary(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["seed"])
    return {
        "seeds": [r["seed"] for r in runs],
        **{m.key: _mean_std([m.of_run(r) for r in runs]) for m in MEASURES},
        **{c.key: _curve_summary(runs, c) for c in CURVES if c.key in runs[0]},
        "final_entropy": {
            "share_below_0.01": _mean_std([r["entropy"]["share_below_0.01"] for r in runs]),
            **{q: _mean_std([r["entropy"]["percentiles"][q] for r in runs]) for q in ("p50", "p80", "p95")},
        },
        "runs": runs,
    }


def _curve_summary(runs: list[dict], curve: Curve) -> dict:
    ks = runs[0][curve.key][curve.values_key]
    return {k: _mean_std([r[curve.key][curve.values_key][k] for r in runs]) for k in ks}


# the experiment fields that say which arms and seeds ran, and how and where: reports of one experiment may differ in
# these and still be merged (threads and processes per run change the numbers: they must agree)
MERGE_FREE_FIELDS = frozenset(
    {"arms", "arm_configs", "seeds", "parallel", "launcher", "rerun", "job_timeout_min", "quick"}
    | {"slurm_partition", "slurm_gpus_per_run", "slurm_cpus_per_run", "slurm_mem_gb", "slurm_job_name"}
    | {"slurm_additional"}
)


def merge_reports(reports: list[dict], command: str) -> dict:
    """One report from the reports of several commands of the same experiment (other seeds, another arm, run on
    another day): the runs of each arm together, the means and spreads computed again. Refused, naming what differs:
    other settings (every experiment and training field but which arms and seeds ran and where), an arm trained with
    other fields, another start measurement (accuracy), the same arm and seed twice. The start model's checksum may
    differ (a checkpoint converted again has another modification time); each report's is kept in `merged_from`."""
    if len(reports) < 2:
        raise ValueError(f"merge needs at least 2 reports; got {len(reports)}.")
    first = reports[0]
    runs: dict[str, list[dict]] = {}
    arm_fields: dict[str, dict] = {}
    for i, report in enumerate(reports):
        where = f"report {i + 1} ({report.get('command', '?')})"
        if i:
            keys = (set(first["ablation"]) | set(report["ablation"])) - MERGE_FREE_FIELDS
            differ = sorted(k for k in keys if first["ablation"].get(k) != report["ablation"].get(k))
            differ += sorted(
                f"training.{k}"
                for k in set(first["training"]) | set(report["training"])
                if first["training"].get(k) != report["training"].get(k)
            )
            if differ:
                raise ValueError(f"{where} is another experiment than report 1: it differs in {', '.join(differ)}.")
            if report["start"]["accuracy"] != first["start"]["accuracy"]:
                raise ValueError(
                    f"{where} measured another start model: accuracy {report['start']['accuracy']} against "
                    f"{first['start']['accuracy']} in report 1."
                )
        for arm, summary in report["arms"].items():
            fields = report["arm_fields"][arm]
            if arm_fields.setdefault(arm, fields) != fields:
                raise ValueError(f"{where}: arm {arm!r} has fields {fields}, another report {arm_fields[arm]}.")
            seen = {r["seed"] for r in runs.get(arm, [])}
            twice = sorted(seen & {r["seed"] for r in summary["runs"]})
            if twice:
                raise ValueError(f"{where}: arm {arm!r} seed(s) {twice} are in an earlier report too.")
            runs.setdefault(arm, []).extend(summary["runs"])
    seeds = sorted({r["seed"] for arm_runs in runs.values() for r in arm_runs})
    return {
        **first,
        "command": command,
        "ablation": {**first["ablation"], "arms": list(runs), "seeds": seeds, "arm_configs": None},
        "arm_fields": arm_fields,
        "arms": {arm: _arm_summary(arm_runs) for arm, arm_runs in runs.items()},
        "failed_runs": [f for r in reports for f in r.get("failed_runs", [])],
        "wall_seconds": sum(r.get("wall_seconds", 0) for r in reports),
        "merged_from": [
            {
                "command": r["command"],
                "start_checksum": r.get("start_checksum"),
                "start": r["start"],
                "runs": [[arm, run["seed"]] for arm, a in r["arms"].items() for run in a["runs"]],
            }
            for r in reports
        ],
    }


# ------------------------------------------------------------------------------------------------------------------
# outputs: plain functions of the report (a test calls them on a small one)


def _merged_lines(report: dict) -> list[str]:
    """For a merged report: which command ran which runs; the start line below is the first report's."""
    if "merged_from" not in report:
        return []
    lines = ["Merged from the results of these commands (the start model measured by the first):", ""]
    for m in report["merged_from"]:
        runs = ", ".join(f"{arm} seed {seed}" for arm, seed in m["runs"])
        lines.append(f"- `{m['command']}`: {runs}; start model checksum {str(m['start_checksum'])[:12]}")
    return [*lines, ""]


def results_markdown(report: dict) -> str:
    start, arms = report["start"], report["arms"]
    k = start["accuracy"]["k"]
    n_seeds = max((a["greedy"]["n"] for a in arms.values()), default=0)
    measures = [m for m in MEASURES if m.shown(report)]
    header, rule = ["arm"], ["---"]
    for m in measures:
        header.append(m.header.format(k=k))
        rule.append("---:")
        if m.of_start is not None:
            header.append("gain")
            rule.append("---:")
    lines = [
        "# Forking-token ablation",
        "",
        f"Command: `{report['command']}`; {report.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        *_merged_lines(report),
        _start_line(start) + ".",
        "",
        f"Held-out accuracy after training, mean ± standard deviation over {n_seeds} seed(s); gain in points over the "
        "start model. Overlap: share of the start model's top-20% entropy positions that are top-20% for the trained "
        "model on the same completions.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(rule) + "|",
    ]
    for arm, a in arms.items():
        cells = [arm]
        for m in measures:
            cells.append(m.text(a[m.key]))
            if m.of_start is not None:
                gain = a[m.key]["mean"] - m.of_start(start)
                cells.append(f"{100 * gain:+.1f}" if m.percent else f"{gain:+.{m.digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    for curve in CURVES:
        if curve.key not in start:
            continue
        p = start[curve.key]
        ks = list(p[curve.values_key])
        lines += [
            "",
            curve.description.format(**p),
            "",
            "| model | " + " | ".join(curve.label.format(k=k) + (" %" if curve.percent else "") for k in ks) + " |",
            "|---|" + "---:|" * len(ks),
            "| start | "
            + " | ".join(
                f"{100 * p[curve.values_key][k]:.1f}" if curve.percent else f"{p[curve.values_key][k]:.2f}" for k in ks
            )
            + " |",
        ]
        for arm, a in arms.items():
            lines.append(f"| {arm} | " + " | ".join(curve.text(a[curve.key][k]) for k in ks) + " |")
    lines += per_token_lines(report)
    lines += ["", *verdicts(report), ""]
    if report.get("failed_runs"):
        lines += ["## Runs that failed (not in the tables above)", ""]
        for f in report["failed_runs"]:
            lines.append(f"- {f['arm']} seed {f['seed']}: {f.get('error') or 'exit ' + str(f.get('exit'))}")
        lines.append("")
    return "\n".join(lines)


def per_token_lines(report: dict) -> list[str]:
    """Per generated token: each arm's gain over the start model in pass@1 (and in coverage at the largest k, for a
    task with several solutions), divided by the completion tokens it sampled in training, per million tokens. The
    same number of optimizer steps can cost different numbers of generated tokens (branching copies prefixes)."""
    start, arms = report["start"], report["arms"]
    if "pass_at_k" not in start or any(a.get("generated_tokens", {}).get("n", 0) == 0 for a in arms.values()):
        return []
    curves = {c.key: c for c in CURVES}
    columns = [(curves["pass_at_k"], "1")]  # pass@1, and coverage at its largest k
    if "coverage" in start:
        columns.append((curves["coverage"], list(start["coverage"]["coverage_at_k"])[-1]))

    def name(curve, k):
        return curve.label.format(k=k)

    lines = [
        "",
        "Per generated token: the gain over the start model divided by the completion tokens sampled in training (a "
        "branch counts its continuation only), in "
        + " and ".join(f"{'points' if c.percent else c.unit} ({name(c, k)})" for c, k in columns)
        + " per million tokens, mean ± standard deviation over seeds (each seed's gain over its own tokens):",
        "",
        "| arm | generated tokens (M) | " + " | ".join(f"{name(c, k)} gain per M tokens" for c, k in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for arm, a in arms.items():
        cells = [arm, _stat(a["generated_tokens"], False, 3)]
        for curve, k in columns:
            scale, base = (100 if curve.percent else 1), start[curve.key][curve.values_key][k]
            per = [
                scale * (r[curve.key][curve.values_key][k] - base) / (r["generated_tokens"] / 1e6)
                for r in a["runs"]
                if r.get("generated_tokens")
            ]
            cells.append(_stat(_mean_std(per), False, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdicts(report: dict) -> list[str]:
    """Plain sentences: does each arm differ from `all` by more than the seed spread (two standard errors of the
    difference of the means), in each measure with a verdict (`MEASURES`) and in each curve at its first and last k?"""
    arms = report["arms"]
    if "all" not in arms:
        return ["No `all` arm to compare with."]
    out = []
    measures = [((m.key,), m.verdict, m.percent) for m in MEASURES if m.verdict and m.shown(report)]
    for curve in CURVES:
        if curve.key in arms["all"]:
            ks = list(arms["all"][curve.key])
            measures += [
                ((curve.key, k), curve.label.format(k=k), curve.percent) for k in dict.fromkeys([ks[0], ks[-1]])
            ]
    for arm, a in arms.items():
        if arm == "all":
            continue
        parts = []
        for path, name, percent in measures:
            s, base = _lookup(a, path), _lookup(arms["all"], path)
            scale, unit, digits = (100, " points", 1) if percent else (1, "", 2)
            diff = scale * (s["mean"] - base["mean"])
            if min(s["n"], base["n"]) < 2:
                parts.append(f"{name} {diff:+.{digits}f}{unit} (one seed: no spread to judge it by)")
                continue
            se2 = 2 * scale * math.sqrt(s["std"] ** 2 / s["n"] + base["std"] ** 2 / base["n"])
            verdict = "exceeds the seed spread" if abs(diff) > se2 else "within the seed spread"
            parts.append(f"{name} {diff:+.{digits}f}{unit} (two standard errors {se2:.{digits}f}: {verdict})")
        out.append(f"- {arm} vs all: " + "; ".join(parts) + ".")
    return out


def _lookup(d: dict, path: tuple):
    for key in path:
        d = d[key]
    return d
