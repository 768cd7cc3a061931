"""The data and the start model of an experiment: the task's training and held-out rows, the tiny start model (shipped
for the CPU recipes' settings, else warm-started here), its checksum, and the measurements every model gets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..models import resolve_model
from ..templates import prompt_text
from .arguments import AblationArguments, shipped_start_model, start_settings


def task_data(ab: AblationArguments) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the experiment's task (`forking_trl.tasks`); held-out problems never appear in
    training."""
    return ab.make_task().split(ab.num_train, ab.num_eval)


def sft_warm_start(base: Path, out: Path, rows: list[dict], *, steps: int, lr: float, batch_size: int, seed: int):
    """Supervised warm start on worked solutions (loss on the completion tokens only); reused when `out` exists.

    Runs in one torch thread whatever the caller's setting: how a CPU kernel splits its work over threads changes
    the last bits of its sums, and 800 steps turn those into another start model (3 threads differed from 1 here).
    """
    from ..tiny import torch_threads

    if (out / "config.json").exists():
        return out
    with torch_threads(1):
        _warm_start(base, out, rows, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    return out


def _warm_start(base: Path, out: Path, rows: list[dict], *, steps: int, lr: float, batch_size: int, seed: int):
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    pad = tokenizer.pad_token_id
    for step in tqdm(range(steps), desc="warm start (SFT)"):
        ids, labels = [], []
        for row in rows[(step * batch_size) % len(rows) :][:batch_size]:
            prompt = prompt_text(tokenizer, row["prompt"])
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            c = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False).input_ids
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])  # (B, L) right-padded
        label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        attention = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
        model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def start_model(ab: AblationArguments, out: Path, train: list[dict]) -> str:
    """The start model: `ab.start_model`; or the tiny Qwen3 of `start_settings(ab)`, a shipped one when those are its
    settings (`ab.bundled_start_model`), else warm-started in `out` on the task's worked completions. What is in `out` is reused only when it has the
    same settings and origin (recorded in `out/start-settings.json`); else it is replaced, with a message."""
    if ab.start_model is not None:  # a folder, a Hub id, a real model's name or a .gguf file
        return str(resolve_model(ab.start_model))
    import shutil

    from ..tiny import build_tiny_model

    settings = start_settings(ab)
    shipped = shipped_start_model(settings) if ab.bundled_start_model else None
    wanted = {**settings, "origin": "shipped" if shipped else "built here"}
    record, model = out / "start-settings.json", out / "start-model"
    made = [out / "start-base", model]
    saved = json.loads(record.read_text()) if record.exists() else None
    if saved != wanted:
        # the record describes only what is on disk: gone before anything is deleted or built, written once the model
        # is complete (a rebuild interrupted here leaves no record, so the next run rebuilds again)
        record.unlink(missing_ok=True)
        if any(p.exists() for p in made):
            print(
                f"start model in {out}: made with {saved or 'unrecorded (or unfinished) settings'}, now asked for "
                f"{wanted}; rebuilding it",
                flush=True,
            )
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
    if shipped and not (model / "config.json").exists():
        shutil.copytree(shipped, model, ignore=shutil.ignore_patterns("start-settings.json"), dirs_exist_ok=True)
        print(
            f"start model: the one shipped for these settings, copied to {model} (the same weights on every "
            "machine; --bundled_start_model false warms one up here)",
            flush=True,
        )
    elif not shipped:
        base = build_tiny_model(out / "start-base", hidden_size=ab.tiny_hidden_size, num_layers=ab.tiny_num_layers)
        sft_warm_start(
            base, model, train, steps=ab.sft_steps, lr=ab.sft_learning_rate, batch_size=ab.sft_batch_size, seed=0
        )
    partial = record.with_suffix(".tmp")
    partial.write_text(json.dumps(wanted, indent=2))
    partial.replace(record)  # atomic: a record is whole or absent
    return str(model)


def measure(model_path: str, ab: AblationArguments, held: list[dict], start_samples=None, start_scored=None) -> dict:
    """Held-out accuracy and entropy pattern of a model, graded by the task; with `pass_k`, pass@k (and for a task
    with several solutions, `coverage` and `answers`); with the start model's samples and entropies, the overlap of
    its top-20% positions with the start model's (teacher forced on the start model's completions)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..analysis import entropy_summary, overlap_summary, score_entropies
    from ..evaluation import evaluate, sample_pass_at_k

    task = ab.make_task()
    torch.manual_seed(1234)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device).eval()
    ev = evaluate(
        model,
        tokenizer,
        held,
        k=ab.eval_k,
        max_new_tokens=ab.eval_max_new_tokens,
        batch_size=ab.eval_batch_size,
        task=task,
    )
    scored = score_entropies(model, tokenizer, ev.samples, batch_size=ab.eval_batch_size)
    summary = entropy_summary(scored)
    result = {
        "accuracy": ev.as_dict(),
        "entropy": {key: summary[key] for key in ("num_tokens", "mean_entropy", "percentiles", "share_below_0.01")},
    }
    if ab.pass_k:
        problems = held[: ab.pass_k_problems or len(held)]
        sampled = sample_pass_at_k(
            model,
            tokenizer,
            problems,
            n=ab.pass_k,
            max_new_tokens=ab.eval_max_new_tokens,
            batch_size=ab.eval_batch_size,
            task=task,
        )
        result["pass_at_k"] = {k: sampled[k] for k in ("n", "num_problems", "pass_at_k", "correct")}
        for key in ("coverage", "answers"):  # a task with several solutions per problem
            if key in sampled:
                result[key] = sampled[key]
    if start_samples is not None:
        on_start = score_entropies(model, tokenizer, start_samples, batch_size=ab.eval_batch_size)
        overlap = overlap_summary(start_scored, on_start, ratio=0.2)
        result["overlap"] = {key: overlap[key] for key in ("overlap", "spearman", "num_tokens")}
    return result, ev, scored


WHOLE_FILE_HASH_BYTES = 256 * 2**20  # files up to this size are hashed whole; larger ones by name, size and mtime


def model_checksum(path: str) -> str:
    """A checksum of the start model: of every file of a local directory (those over 256 MiB by name, size and
    modification time, so that a large model is not read in full), or of the name itself for a Hub id."""
    root = Path(path)
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(f"hub:{path}".encode())
        return digest.hexdigest()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        size = file.stat().st_size
        if size <= WHOLE_FILE_HASH_BYTES:
            digest.update(file.read_bytes())
        else:
            digest.update(f"{size}:{file.stat().st_mtime_ns}".encode())
    return digest.hexdigest()
