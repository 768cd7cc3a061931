"""Entropy patterns of a model's chain-of-thought, and the overlap of forking positions between two models.

The three analyses of "Beyond the 80/20 Rule" (arXiv 2506.01939), runnable on any causal LM:
- `sample_and_score`: sample completions, then score every completion token's entropy by teacher forcing;
- `entropy_summary` / `plot_histogram` / `write_html`: percentiles, the share below 0.01, the most frequent
  high- and low-entropy tokens, a log-scale histogram, and completions coloured token by token;
- `overlap_summary` / `plot_overlap`: how many of one model's top-ρ entropy positions are also top-ρ for another.

The command line (`forking-trl analyze | overlap`, `forking_trl/cli.py`) wires these to files.
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from .entropy import LOW_ENTROPY, token_entropy
from .selection import forking_mask
from .templates import prompt_text

PERCENTILES = (50, 80, 90, 95, 99)


@dataclass
class ScoredCompletion:
    """One completion: its token ids, their decoded texts, and each token's entropy (nats)."""

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    entropies: list[float]


# ------------------------------------------------------------------------------------------------------------------
# sampling and teacher-forced scoring


def _prompt_texts(tokenizer, prompts: list) -> list[str]:
    """Each prompt as the model is given it: text as it is; chat messages through the tokenizer's chat template, or
    the plain template for a model without one (`forking_trl.templates.prompt_text`)."""
    return [prompt_text(tokenizer, p) for p in prompts]


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float, batch_size: int, progress=None
) -> list[tuple[str, list[int]]]:
    """Sample one completion per prompt with transformers `generate`; returns (prompt text, completion ids)."""
    texts = _prompt_texts(tokenizer, prompts)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generated = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        for text, ids in zip(batch, generated[:, enc.input_ids.shape[1] :].tolist(), strict=True):
            ids = _strip_after_eos(ids, tokenizer)
            out.append((text, ids))
        if progress is not None:
            progress.update(len(batch))
    return out


def generate_completions_vllm(
    model_path: str, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float
) -> list[tuple[str, list[int]]]:
    """Sample one completion per prompt with vLLM; returns (prompt text, completion ids)."""
    from vllm import LLM, SamplingParams

    texts = _prompt_texts(tokenizer, prompts)
    llm = LLM(model=model_path)
    params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens)
    results = llm.generate(texts, params)
    return [(t, list(r.outputs[0].token_ids)) for t, r in zip(texts, results, strict=True)]


def _strip_after_eos(ids: list[int], tokenizer) -> list[int]:
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1] if token == tokenizer.eos_token_id else ids[:i]
    return ids


@torch.no_grad()
def score_entropies(
    model,
    tokenizer,
    samples: list[tuple[str, list[int]]],
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    progress=None,
) -> list[ScoredCompletion]:
    """Teacher-force each (prompt, completion ids) through `model`; entropy of softmax(logits / T) per token."""
    device = next(model.parameters()).device
    scored = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        rows, spans = [], []
        for prompt, completion in batch:
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            rows.append(prompt_ids + completion)
            spans.append((len(prompt_ids), len(completion)))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # (B, L) right-padded
        attention = (
            torch.arange(width, device=device)[None] < torch.tensor([len(r) for r in rows], device=device)[:, None]
        ).long()
        logits = model(input_ids=input_ids, attention_mask=attention).logits  # (B, L, V)
        # the distribution a token was drawn from sits one position before it
        entropies = token_entropy(logits[:, :-1], temperature=temperature).cpu()  # (B, L-1)
        for row, (prompt, completion), (p_len, c_len) in zip(range(len(batch)), batch, spans, strict=True):
            values = entropies[row, p_len - 1 : p_len - 1 + c_len].tolist()
            tokens = [tokenizer.decode([t]) for t in completion]
            scored.append(ScoredCompletion(prompt, list(completion), tokens, values))
        if progress is not None:
            progress.update(len(batch))
    return scored


# ------------------------------------------------------------------------------------------------------------------
# entropy patterns


def entropy_summary(scored: list[ScoredCompletion], *, ratio: float = 0.2, top_k: int = 30) -> dict:
    """Percentiles, share below 0.01, and the most frequent top-ρ (forking) and low-entropy tokens."""
    values = torch.tensor([h for s in scored for h in s.entropies], dtype=torch.float32)
    ids = [t for s in scored for t in s.token_ids]
    texts = [t for s in scored for t in s.tokens]
    if values.numel() == 0:
        raise ValueError("no completion tokens to analyse: check --max-new-tokens and the prompts")
    quantiles = numpy.percentile(values.numpy(), PERCENTILES)  # no size limit, unlike torch.quantile
    top = forking_mask(values, torch.ones_like(values, dtype=torch.bool), mode="top", ratio=ratio)
    return {
        "num_completions": len(scored),
        "num_tokens": int(values.numel()),
        "mean_entropy": float(values.mean()),
        "percentiles": {f"p{p}": float(q) for p, q in zip(PERCENTILES, quantiles, strict=True)},
        "share_below_0.01": float((values < LOW_ENTROPY).float().mean()),
        "top_ratio": ratio,
        "top_threshold": float(values[top].min()),
        "top_tokens": _frequent(ids, texts, values, top, top_k),
        "low_entropy_tokens": _frequent(ids, texts, values, values < LOW_ENTROPY, top_k),
    }


def outcome_summary(scored: list[ScoredCompletion], solutions: list, tokenizer, *, ratio: float = 0.2) -> dict:
    """Each completion graded against its gold answer (`forking_trl.rewards.accuracy_reward`; None: no gold), and the
    entropy pattern of the right and of the wrong ones apart: `accuracy`, `num_graded`, and `by_outcome` with an
    `entropy_summary` (without its token lists) per outcome that has completions."""
    from .rewards import accuracy_reward

    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in scored]
    grades = accuracy_reward(texts, solutions)
    graded = [(s, g) for s, g in zip(scored, grades, strict=True) if g is not None]
    out = {"accuracy": None, "num_graded": len(graded), "by_outcome": {}}
    if not graded:
        return out
    out["accuracy"] = sum(g for _, g in graded) / len(graded)
    for outcome, wanted in (("right", 1.0), ("wrong", 0.0)):
        group = [s for s, g in graded if g == wanted and s.token_ids]
        if group:
            summary = entropy_summary(group, ratio=ratio, top_k=10)
            out["by_outcome"][outcome] = {k: v for k, v in summary.items() if k != "low_entropy_tokens"}
    return out


def _frequent(ids, texts, values, selected: torch.Tensor, k: int) -> list[dict]:
    counts: Counter[int] = Counter()
    sums: defaultdict[int, float] = defaultdict(float)
    text_of = {}
    for i in selected.nonzero().squeeze(1).tolist():
        counts[ids[i]] += 1
        sums[ids[i]] += float(values[i])
        text_of[ids[i]] = texts[i]
    return [{"token": text_of[t], "count": c, "mean_entropy": sums[t] / c} for t, c in counts.most_common(k)]


def plot_histogram(scored: list[ScoredCompletion], summary: dict, path: str | Path) -> None:
    """Histogram of token entropies, log-scale counts, with the 80th percentile marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [h for s in scored for h in s.entropies]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(values, bins=60, color="#4c72b0")
    ax.set_yscale("log")
    p80 = summary["percentiles"]["p80"]
    ax.axvline(p80, color="#c44e52", linestyle="--", label=f"80th percentile = {p80:.3f} nats")
    ax.set(
        title=f"Token entropy of {summary['num_tokens']:,} completion tokens",
        xlabel="entropy (nats)",
        ylabel="number of tokens (log scale)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_html(scored: list[ScoredCompletion], summary: dict, path: str | Path, max_completions: int = 8) -> None:
    """Completions token by token, coloured by entropy (white → red at the max), value on hover."""
    vmax = max((h for s in scored for h in s.entropies), default=1.0) or 1.0
    threshold = summary["top_threshold"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>forking_trl: token entropy</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".c{white-space:pre-wrap;font-family:monospace;border:1px solid #ccc;padding:.6em;margin:1em 0}"
        ".t{border-radius:2px}.f{outline:1px solid #900}.p{color:#666;font-size:.9em}",
        "</style></head><body>",
        f"<h1>Token entropy</h1><p>Hover a token for its entropy (nats). Red: high entropy; outlined: top "
        f"{100 * summary['top_ratio']:.0f}% (entropy ≥ {threshold:.3f}). p50 = {summary['percentiles']['p50']:.3f}, "
        f"p80 = {summary['percentiles']['p80']:.3f}.</p>",
    ]
    for s in scored[:max_completions]:
        parts.append(f"<div class='p'>{html.escape(s.prompt[-300:])}</div><div class='c'>")
        for token, h in zip(s.tokens, s.entropies, strict=True):
            alpha = min(1.0, h / vmax)
            cls = "t f" if h >= threshold else "t"
            parts.append(
                f"<span class='{cls}' title='{h:.4f}' style='background:rgba(220,40,40,{alpha:.3f})'>"
                f"{html.escape(token)}</span>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    Path(path).write_text("".join(parts), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------------
# overlap of forking positions between two models


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def _ranks(x: torch.Tensor) -> torch.Tensor:
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of the first element of each distinct value
    return (first + (counts - 1) / 2.0)[inverse]


def overlap_summary(base: list[ScoredCompletion], other: list[ScoredCompletion], *, ratio: float = 0.2) -> dict:
    """Share of the base model's top-ρ entropy positions that are also top-ρ under the other model."""
    h0 = torch.tensor([h for s in base for h in s.entropies], dtype=torch.float32)
    h1 = torch.tensor([h for s in other for h in s.entropies], dtype=torch.float32)
    if h0.shape != h1.shape or h0.numel() == 0:
        raise ValueError("the two models must score the same, non-empty set of tokens")
    valid = torch.ones_like(h0, dtype=torch.bool)
    top0 = forking_mask(h0, valid, mode="top", ratio=ratio, selection="exact")
    top1 = forking_mask(h1, valid, mode="top", ratio=ratio, selection="exact")
    both = (top0 & top1).sum().item()
    return {
        "num_tokens": int(h0.numel()),
        "ratio": ratio,
        "overlap": both / max(1, int(top0.sum())),
        "spearman": spearman(h0, h1) if h0.numel() > 1 else math.nan,
        "mean_entropy_base": float(h0.mean()),
        "mean_entropy_other": float(h1.mean()),
        "mean_abs_change_top": float((h1 - h0)[top0].abs().mean()),
        "mean_abs_change_rest": float((h1 - h0)[~top0].abs().mean()) if (~top0).any() else 0.0,
    }


def plot_overlap(
    base: list[ScoredCompletion],
    other: list[ScoredCompletion],
    summary: dict,
    path: str | Path,
    labels: tuple[str, str] = ("base", "other"),
) -> None:
    """Scatter of per-token entropy under both models; the base's top-ρ positions highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h0 = torch.tensor([h for s in base for h in s.entropies])
    h1 = torch.tensor([h for s in other for h in s.entropies])
    top0 = forking_mask(h0, torch.ones_like(h0, dtype=torch.bool), ratio=summary["ratio"], selection="exact")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(h0[~top0], h1[~top0], s=4, alpha=0.4, color="#999999", label="other tokens")
    ax.scatter(
        h0[top0], h1[top0], s=6, alpha=0.7, color="#c44e52", label=f"{labels[0]} top {100 * summary['ratio']:.0f}%"
    )
    hi = float(max(h0.max(), h1.max()))
    ax.plot([0, hi], [0, hi], color="black", linewidth=0.8)
    ax.set(
        title=f"Forking-position overlap {100 * summary['overlap']:.1f}%, Spearman {summary['spearman']:.3f}",
        xlabel=f"entropy under {labels[0]} (nats)",
        ylabel=f"entropy under {labels[1]} (nats)",
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
