"""Offline demo: forking-token GRPO (top 20% entropy) on a tiny Qwen3, on CPU, in a few minutes.

    make demo                                   # = python examples/demo.py --output_dir outputs/demo

1. builds a tiny Qwen3 and tokenizer (no download) if missing;
2. warm-starts it briefly on synthetic arithmetic with worked answers, so sampled rewards are neither all 0 nor all 1;
3. trains it with ForkingGRPOTrainer (forking_mode="top", forking_ratio=0.2) and the math accuracy reward;
4. writes metrics.jsonl, training.png (reward and kept fraction over steps) and summary.json to --output_dir.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from forking_trl import ForkingGRPOConfig, ForkingGRPOTrainer  # noqa: E402
from forking_trl.data import synthetic_arithmetic  # noqa: E402
from forking_trl.rewards import accuracy_reward  # noqa: E402
from forking_trl.tiny import build_tiny_model  # noqa: E402


def warm_start(base: Path, out: Path, steps: int, seed: int) -> Path:
    """Supervised warm start on worked arithmetic (loss on the answer tokens only)."""
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = synthetic_arithmetic(4096, seed=seed + 1, max_operand=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in tqdm(range(steps), desc="warm start (SFT)"):
        batch = rows[(step * 32) % len(rows) :][:32]
        ids, labels = [], []
        for row in batch:
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            c = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False).input_ids
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        attention = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class JsonlMetrics(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, [m["reward"] for m in metrics], marker=".", label="per step")
    window = 5
    smooth = [
        sum(m["reward"] for m in metrics[max(0, i - window + 1) : i + 1]) / min(window, i + 1)
        for i in range(len(metrics))
    ]
    ax1.plot(steps, smooth, linewidth=2, label=f"mean of last {window}")
    ax1.set(title="Accuracy reward", xlabel="optimizer step", ylabel="mean reward (fraction correct)", ylim=(0, 1))
    ax1.legend()
    ax2.plot(steps, [m["forking/kept_fraction"] for m in metrics], marker=".")
    ax2.set(
        title="Tokens receiving policy gradient",
        xlabel="optimizer step",
        ylabel="kept fraction of valid tokens",
        ylim=(0, 1),
    )
    ax2.axhline(0.2, color="gray", linestyle="--", linewidth=1)
    fig.suptitle("forking_trl demo: GRPO on the top-20% entropy tokens (tiny Qwen3, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--sft_steps", type=int, default=200, help="warm-start steps (batch 32)")
    parser.add_argument("--grpo_steps", type=int, default=150, help="GRPO optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()

    start = time.time()
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model(out / "tiny-base", hidden_size=128, num_layers=2, seed=cli.seed)
    sft = warm_start(base, out / "tiny-sft", cli.sft_steps, cli.seed)

    train = Dataset.from_list(
        [
            {k: r[k] for k in ("prompt", "solution")}
            for r in synthetic_arithmetic(4096, seed=cli.seed + 2, max_operand=9)
        ]
    )
    args = ForkingGRPOConfig(
        output_dir=str(out / "grpo"),
        forking_mode="top",
        forking_ratio=0.2,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=24,
        temperature=1.0,
        learning_rate=3e-4,
        beta=0.0,
        loss_type="dapo",
        max_steps=cli.grpo_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=cli.seed,
        forking_log_top_tokens=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(sft)
    metrics_path = out / "metrics.jsonl"
    trainer = ForkingGRPOTrainer(
        str(sft),
        accuracy_reward,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[JsonlMetrics(metrics_path)],
    )
    trainer.train()

    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    plot(metrics, out / "training.png")
    k = max(1, len(metrics) // 5)
    first = sum(m["reward"] for m in metrics[:k]) / k
    last = sum(m["reward"] for m in metrics[-k:]) / k
    summary = {
        "steps": len(metrics),
        "reward_first_steps": round(first, 4),
        "reward_last_steps": round(last, 4),
        "window": k,
        "kept_fraction_mean": round(sum(m["forking/kept_fraction"] for m in metrics) / len(metrics), 4),
        "wall_seconds": round(time.time() - start, 1),
        "metrics": str(metrics_path),
        "plot": str(out / "training.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nforking_trl demo: mean reward {first:.3f} over the first {k} steps -> {last:.3f} over the last {k}; "
        f"kept fraction {summary['kept_fraction_mean']:.3f}; {summary['wall_seconds']:.0f} s.\n"
        f"metrics: {metrics_path}\nplot: {out / 'training.png'}\nsummary: {out / 'summary.json'}"
    )


if __name__ == "__main__":
    main()
