"""The figures of an experiment's report: accuracy by arm, each curve the start model has (pass@k, coverage@k), pass@1
against exploration, entropy over training. Plain functions of the report dict (`report`), drawn with matplotlib's
Agg backend (no display needed)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .report import CURVES, MEASURES, Curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict, path: Path) -> None:
    """A panel per plotted measure (`MEASURES`): each seed a dot, the mean a bar with ± std, the start model a line."""
    plt = _pyplot()
    arms, start = report["arms"], report["start"]
    k = start["accuracy"]["k"]
    panels = [m for m in MEASURES if m.plot]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], panels):
        for i, (arm, a) in enumerate(arms.items()):
            stat = a[m.key]
            ax.bar(i, 100 * stat["mean"], yerr=100 * stat["std"], color=f"C{i}", alpha=0.5, capsize=4)
            values = [100 * v for v in stat["values"] if v is not None]
            ax.scatter([i] * len(values), values, color=f"C{i}", zorder=3, s=14)
        if m.of_start is not None:
            ax.axhline(100 * m.of_start(start), color="black", linestyle="--", linewidth=1, label="start model")
            ax.legend(loc="lower right")
        ax.set_xticks(range(len(arms)), list(arms))
        ax.set(title=f"Held-out, {m.plot.format(k=k)}", ylabel="%")
    fig.suptitle("Policy gradient on which tokens? (dots: seeds; bars: mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curve(report: dict, curve: Curve, path: Path) -> None:
    """The curve against k per arm (line: mean over seeds; band: min to max), the start model dashed."""
    plt = _pyplot()
    start = report["start"][curve.key]
    ks = list(start[curve.values_key])
    x = [int(k) for k in ks]
    scale = 100 if curve.percent else 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        x, [scale * start[curve.values_key][k] for k in ks], color="black", linestyle="--", marker="o", label="start"
    )
    for i, (arm, a) in enumerate(report["arms"].items()):
        stats = [a[curve.key][k] for k in ks]
        ax.plot(x, [scale * s["mean"] for s in stats], color=f"C{i}", marker="o", markersize=3, label=arm)
        low = [scale * min(v for v in s["values"] if v is not None) for s in stats]
        high = [scale * max(v for v in s["values"] if v is not None) for s in stats]
        ax.fill_between(x, low, high, color=f"C{i}", alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, ks)
    label = curve.label.format(k="k")
    ax.set(
        xlabel="k (samples drawn)",
        ylabel=f"{label}, {curve.unit}",
        title=f"{label} at T = 1, {start['num_problems']} held-out problems, n = {start['n']}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_exploration(report: dict, path: Path) -> None:
    """Exploitation against exploration, one dot per run: pass@1 against coverage at the largest k (or pass@k there,
    for a task with one solution per problem); the start model a star. Up and to the right is better; a method that
    trades exploration for accuracy moves right and down from the start."""
    plt = _pyplot()
    start = report["start"]
    key = "coverage" if "coverage" in start else "pass_at_k"
    curve = next(c for c in CURVES if c.key == key)
    k = list(start[key][curve.values_key])[-1]
    scale = 100 if curve.percent else 1
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (arm, a) in enumerate(report["arms"].items()):
        runs = [r for r in a["runs"] if key in r and "pass_at_k" in r]
        x = [100 * r["pass_at_k"]["pass_at_k"]["1"] for r in runs]
        y = [scale * r[key][curve.values_key][k] for r in runs]
        ax.scatter(x, y, color=f"C{i}", label=arm, s=28)
        if x:
            ax.scatter([statistics.fmean(x)], [statistics.fmean(y)], color=f"C{i}", marker="x", s=60)
    ax.scatter(
        [100 * start["pass_at_k"]["pass_at_k"]["1"]],
        [scale * start[key][curve.values_key][k]],
        color="black",
        marker="*",
        s=160,
        label="start",
        zorder=3,
    )
    ylabel = curve.label.format(k=k) + ("" if curve.percent else f", {curve.unit}") + (" %" if curve.percent else "")
    ax.set(xlabel="pass@1 % (exploitation)", ylabel=ylabel, title="Each run after training (x: the arm's mean)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rolling(values: list[float], window: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_entropy_training(report: dict, path: Path) -> None:
    """Training reward and entropy per arm (mean over seeds, band: min to max): the reward, the mean and p80 entropy,
    and the share of tokens below 0.01 nats (and the covariance, when runs log it)."""
    plt = _pyplot()
    panels = [
        ("reward", "training reward (mean of the batch)"),
        ("entropy", "mean entropy (nats)"),
        ("entropy/p80", "p80 entropy (nats)"),
        ("entropy/share_below_0.01", "share of tokens < 0.01 nats"),
    ]
    if any("cov/mean" in h for a in report["arms"].values() for r in a["runs"] for h in r["history"]):
        panels.append(("cov/mean", "cov(log π, A), mean over tokens"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4))
    for i, (arm, a) in enumerate(report["arms"].items()):
        for ax, (key, label) in zip(axes, panels):
            series = [[h[key] for h in r["history"] if key in h] for r in a["runs"]]
            series = [s for s in series if s]
            if not series:
                continue
            length = min(map(len, series))
            steps = [h["step"] for h in a["runs"][0]["history"]][:length]
            rows = [s[:length] for s in series]
            rows = [_rolling(r) for r in rows]  # (seeds, steps), each a rolling mean over 10 steps
            mean = [statistics.fmean(col) for col in zip(*rows)]
            ax.plot(steps, mean, color=f"C{i}", label=arm)
            low, high = [min(c) for c in zip(*rows)], [max(c) for c in zip(*rows)]
            ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.15)
            ax.set(xlabel="optimizer step", ylabel=label)
    axes[0].legend()
    fig.suptitle(
        "Training reward, and entropy of all completion tokens (rolling mean of 10 steps; line: mean over seeds; "
        "band: min to max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
