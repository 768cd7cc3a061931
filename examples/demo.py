"""Offline demo: forking-token GRPO (top 20% entropy) beside all-token GRPO, tiny Qwen3, CPU, under 2 minutes.

    make demo                                   # = python examples/demo.py --output_dir outputs/demo

1. builds a tiny Qwen3 and tokenizer (no download) if missing;
2. warm-starts it briefly on synthetic arithmetic with worked answers, so sampled rewards are neither all 0 nor all 1
   (in one thread, so the same start on any core count);
3. trains two arms from that same start with the math accuracy reward, identical but for the tokens that receive
   policy gradient: `top` (ForkingGRPOTrainer, forking_mode="top", forking_ratio=0.2) and `all` (every token);
4. writes metrics_top.jsonl, metrics_all.jsonl, training.png (reward of both arms over steps; entropy of the kept
   and of the dropped tokens) and summary.json (both arms) to --output_dir.

Torch threads: `OMP_NUM_THREADS` when set, else as many as there are idle cores at the start (a tiny model's ops
are small, and a thread that another process has descheduled stalls the others at every op).

One demo run is one seed: its difference between the arms is not a finding. For that, see `make ablation`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402

from forking_trl import ForkingGRPOConfig, ForkingGRPOTrainer  # noqa: E402
from forking_trl.ablation import sft_warm_start  # noqa: E402
from forking_trl.tasks import Arithmetic, Task  # noqa: E402
from forking_trl.tiny import build_tiny_model, pick_threads  # noqa: E402

ARMS = {"top": ("top", 0.2), "all": ("all", 1.0)}
KEYS = ("reward", "entropy", "forking/kept_fraction", "forking/entropy_kept", "forking/entropy_dropped")


class QuietProgress(TrainerCallback):
    """A progress bar and one summary line every `every` steps, instead of the metric dict of every step; the
    metrics go to a JSON-lines file."""

    def __init__(self, path: Path, arm: str, every: int = 25):
        self.path, self.arm, self.every, self.bar, self.recent = path, arm, every, None, []
        path.write_text("")

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=f"GRPO, {self.arm} tokens", leave=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **{k: logs[k] for k in KEYS if k in logs}}) + "\n")
        self.recent.append(logs["reward"])
        self.bar.update(state.global_step - self.bar.n)
        if state.global_step % self.every == 0:
            mean = sum(self.recent) / len(self.recent)
            self.bar.write(
                f"  {self.arm:>3} step {state.global_step:>4}: reward {mean:.3f} "
                f"(mean of the last {len(self.recent)}), "
                f"kept {logs.get('forking/kept_fraction', float('nan')):.2f}, "
                f"entropy {logs.get('entropy', float('nan')):.3f}"
            )
            self.recent = []

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def smooth(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(values))]


def plot(metrics: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arm, rows) in enumerate(metrics.items()):
        steps = [m["step"] for m in rows]
        ax1.plot(steps, [m["reward"] for m in rows], color=f"C{i}", alpha=0.25, linewidth=1)
        ax1.plot(steps, smooth([m["reward"] for m in rows]), color=f"C{i}", linewidth=2, label=f"{arm} tokens")
        ax2.plot(steps, smooth([m["entropy"] for m in rows]), color=f"C{i}", linewidth=2, label=f"{arm}: all tokens")
    top = metrics["top"]
    steps = [m["step"] for m in top]
    ax2.plot(steps, smooth([m["forking/entropy_kept"] for m in top]), "C0--", label="top: kept (top 20%)")
    ax2.plot(steps, smooth([m["forking/entropy_dropped"] for m in top]), "C0:", label="top: dropped (other 80%)")
    ax1.set(title="Accuracy reward (thin: per step; thick: mean of 10)", xlabel="optimizer step", ylim=(0, 1))
    ax1.set_ylabel("mean reward (fraction correct)")
    ax2.set(title="Mean token entropy (mean of 10 steps)", xlabel="optimizer step", ylabel="nats")
    ax1.legend()
    ax2.legend(fontsize=8)
    fig.suptitle(
        "forking_trl demo: policy gradient on the top-20% entropy tokens vs all tokens (tiny Qwen3, CPU, 1 seed)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_arm(arm: str, sft: Path, out: Path, task: Task, train: Dataset, steps: int, seed: int) -> list[dict]:
    mode, ratio = ARMS[arm]
    args = ForkingGRPOConfig(
        output_dir=str(out / f"grpo-{arm}"),
        forking_mode=mode,
        forking_ratio=ratio,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=24,
        temperature=1.0,
        learning_rate=3e-4,
        beta=0.0,
        loss_type="dapo",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        forking_log_top_tokens=0,
        disable_tqdm=True,
    )
    path = out / f"metrics_{arm}.jsonl"
    trainer = ForkingGRPOTrainer(
        str(sft),
        task.reward_funcs(),
        args=args,
        train_dataset=train,
        processing_class=AutoTokenizer.from_pretrained(sft),
        callbacks=[QuietProgress(path, arm)],
    )
    trainer.remove_callback(PrinterCallback)  # the quiet progress above replaces the per-step metric dicts
    trainer.train()
    return [json.loads(line) for line in path.read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--sft_steps", type=int, default=200, help="warm-start steps (batch 32)")
    parser.add_argument("--grpo_steps", type=int, default=150, help="GRPO optimizer steps of each arm")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()

    start = time.time()
    threads, why = pick_threads()  # a tiny model on a busy CPU runs faster in fewer threads
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} ({why}; set OMP_NUM_THREADS to choose)", flush=True)
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model(out / "tiny-base", hidden_size=128, num_layers=2, seed=cli.seed)
    task = Arithmetic(max_operand=9)  # forking_trl.tasks: rows with worked answers, the reward, the grading
    rows = task.rows(4096, seed=cli.seed + 1)
    sft = sft_warm_start(base, out / "tiny-sft", rows, steps=cli.sft_steps, lr=3e-3, batch_size=32, seed=cli.seed)
    train = Dataset.from_list(task.training_rows(task.rows(4096, seed=cli.seed + 2)))

    metrics = {}
    for arm in ARMS:  # the same warm start, data, seed and settings; only the tokens with policy gradient differ
        metrics[arm] = train_arm(arm, sft, out, task, train, cli.grpo_steps, cli.seed)
    plot(metrics, out / "training.png")

    k = max(1, cli.grpo_steps // 5)
    summary = {"steps": cli.grpo_steps, "window": k, "seed": cli.seed, "arms": {}}
    for arm, rows_ in metrics.items():
        first = sum(m["reward"] for m in rows_[:k]) / k
        last = sum(m["reward"] for m in rows_[-k:]) / k
        summary["arms"][arm] = {
            "reward_first_steps": round(first, 4),
            "reward_last_steps": round(last, 4),
            "kept_fraction_mean": round(sum(m["forking/kept_fraction"] for m in rows_) / len(rows_), 4),
            "entropy_last_steps": round(sum(m["entropy"] for m in rows_[-k:]) / k, 4),
            "metrics": str(out / f"metrics_{arm}.jsonl"),
        }
    summary.update(wall_seconds=round(time.time() - start, 1), plot=str(out / "training.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nforking_trl demo, one seed, {cli.grpo_steps} GRPO steps per arm from the same warm start:")
    for arm, a in summary["arms"].items():
        print(
            f"  {arm:>3} tokens: mean reward {a['reward_first_steps']:.3f} over the first {k} steps -> "
            f"{a['reward_last_steps']:.3f} over the last {k}; kept fraction {a['kept_fraction_mean']:.3f}; "
            f"entropy at the end {a['entropy_last_steps']:.3f}"
        )
    print(
        f"  one seed: the difference between the arms is not a finding (make ablation: 5 seeds per arm).\n"
        f"{summary['wall_seconds']:.0f} s. plot: {out / 'training.png'}\nsummary: {out / 'summary.json'}"
    )


if __name__ == "__main__":
    main()
