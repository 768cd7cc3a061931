"""The paper's three findings in miniature: entropy pattern, overlap after RL, and the token-selection ablation.

`examples/ablation.py` is the command; this module does the work, so that a test can call each piece.

1. One start model: the tiny offline Qwen3 warm-started on `synthetic_chain` in one torch thread (shipped in
   `bundled_data/start_model` for the CPU recipes' settings, so every machine starts from the same weights), or any
   model path. Its held-out accuracy (greedy and sampled avg@k) and the entropy pattern of its sampled completions
   (finding 1), measured in `threads_per_run` threads as the runs measure themselves.
2. Every arm from that start, identical but for the forking and entropy-method fields. Arms are named
   configurations: the paper's `all`, `top` 0.2, `bottom` 0.8, `random` 0.2, the methods that followed it on all
   tokens at their papers' defaults, `clip_cov`, `kl_cov` and `entropy_adv`, and any a recipe defines in
   `arm_configs` (e.g. `top10: {forking_mode: top, forking_ratio: 0.1}`), each over several seeds; every arm's
   command line is validated before anything trains; each run in its own process (one torch thread each,
   `parallel` at a time).
3. Each trained model: held-out accuracy, the entropy pattern of its own completions, and the overlap of its top-20%
   entropy positions with the start model's on the start model's completions (teacher forced; finding 2).
4. `results.json`, `results.md`, `accuracy.png`, `entropy_training.png`, `start_entropy_histogram.png`,
   `start_tokens.html`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# the built-in arms: the fields each sets on top of ARM_BASE (`random` keeps as many tokens as `top`)
ARM_BASE = {"forking_mode": "all", "forking_ratio": 1.0, "entropy_method": "none"}
ARMS = {
    "all": {},
    "top": {"forking_mode": "top", "forking_ratio": 0.2},
    "bottom": {"forking_mode": "bottom", "forking_ratio": 0.8},
    "random": {"forking_mode": "random", "forking_ratio": 0.2},
    "clip_cov": {"entropy_method": "clip_cov"},  # at the method's defaults (ForkingGRPOConfig), on all tokens
    "kl_cov": {"entropy_method": "kl_cov"},
    "entropy_adv": {"entropy_method": "entropy_adv"},
}
PAPER_ARMS = ["all", "top", "bottom", "random"]
REWARD_NAMES = ("accuracy_reward",)  # the reward functions every run trains with (forking_trl.rewards)
TRACKED = (
    *("reward", "entropy", "entropy/p50", "entropy/p80", "entropy/p95", "entropy/share_below_0.01", "forking/ratio"),
    *("cov/mean", "cov/kept", "clip_cov/clipped_fraction", "kl_cov/penalized_fraction", "kl_cov/penalty"),
    *("entropy_adv/shaping", "entropy_adv/capped_fraction"),
)


@dataclass
class AblationArguments:
    """What the ablation compares and how it measures; the GRPO settings are the `ForkingGRPOConfig` fields."""

    arms: list[str] = field(
        default_factory=lambda: list(PAPER_ARMS),
        metadata={
            "help": f"Arms to train: built in, {', '.join(ARMS)} (all: every token; top 0.2; bottom 0.8; random "
            "0.2; an entropy method on all tokens at its defaults), or any named in arm_configs."
        },
    )
    arm_configs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Arms of this recipe: {name: {field: value}} with forking_trl's fields (forking_*, "
            "entropy_method, clip_cov_*, kl_cov_*, entropy_adv_*), as YAML or JSON. Unset forking_mode, "
            "forking_ratio and entropy_method are all, 1.0 and none; a built-in name is redefined."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "GRPO seeds of every arm."})
    task: str = field(
        default="chain",
        metadata={
            "help": "Training data: 'chain' (synthetic two-step +/- arithmetic with a worked chain, the CPU "
            "miniature) or a dataset for forking_trl.data.load_math_dataset (bundled name or file)."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out set for a dataset task (bundled name or file); 'chain' makes its own."},
    )
    num_train: int = field(default=20000, metadata={"help": "Training problems (chain task; a cap otherwise)."})
    num_eval: int = field(default=200, metadata={"help": "Held-out problems (never in the training set)."})
    eval_k: int = field(default=4, metadata={"help": "Samples per held-out problem for sampled avg@k (T = 1)."})
    pass_k: int = field(
        default=0,
        metadata={
            "help": "Samples per held-out problem for pass@k at T = 1, reported for k = 1, 2, 4, ..., pass_k "
            "(unbiased estimator, Chen et al. 2021); 0: off."
        },
    )
    pass_k_problems: int = field(
        default=0, metadata={"help": "Held-out problems pass@k is measured on (the first ones); 0: all num_eval."}
    )
    eval_max_new_tokens: int = field(default=40, metadata={"help": "Completion length at evaluation."})
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generate call at evaluation."})
    max_operand: int = field(default=20, metadata={"help": "Chain task: operands from 0 to this."})
    start_model: str | None = field(
        default=None,
        metadata={"help": "Start model path or Hub id; None builds the tiny Qwen3 and warm-starts it on the task."},
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny start model: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Tiny start model: layers."})
    sft_steps: int = field(default=800, metadata={"help": "Tiny start model: supervised warm-start steps."})
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "Tiny start model: warm-start learning rate."})
    sft_batch_size: int = field(default=32, metadata={"help": "Tiny start model: warm-start batch size."})
    bundled_start_model: bool = field(
        default=True,
        metadata={
            "help": "Tiny start model: when the start settings are those of the start model shipped with forking_trl "
            "(the CPU recipes'), copy it instead of warming one up: the same weights on every machine. False: build "
            "it here (bit-identical to the shipped one on the machine that built it; another CPU's kernels may "
            "differ in the last bits, and 800 steps make that another model)."
        },
    )
    parallel: int = field(default=2, metadata={"help": "Runs trained at the same time, one process each."})
    threads_per_run: int = field(default=1, metadata={"help": "torch threads of each run's process."})
    quick: bool = field(
        default=False,
        metadata={"help": "Every stage on a small setting (under a minute on 2 CPU cores): a smoke test."},
    )

    def __post_init__(self):
        from .config import OWN_FIELD_PREFIXES

        if isinstance(self.arm_configs, str):
            try:
                self.arm_configs = json.loads(self.arm_configs)
            except json.JSONDecodeError as err:
                raise ValueError(f"arm_configs must be a mapping (YAML, or JSON on the command line): {err}") from err
        configs = self.arm_configs or {}
        if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
            raise ValueError(f"arm_configs must map arm names to {{field: value}} mappings; got {configs!r}.")
        for name, overrides in configs.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
                raise ValueError(f"arm_configs: arm name {name!r} must be letters, digits, '_', '.' or '-'.")
            bad = [k for k in overrides if not str(k).startswith(OWN_FIELD_PREFIXES)]
            if bad:
                raise ValueError(
                    f"arm_configs[{name!r}]: {', '.join(map(repr, bad))} not an arm field; arms differ only in "
                    f"forking_trl's own fields ({', '.join(p + '*' for p in OWN_FIELD_PREFIXES)})."
                )
        known = [*ARMS, *(n for n in configs if n not in ARMS)]
        unknown = [a for a in self.arms if a not in known]
        if unknown or not self.arms:
            raise ValueError(f"arms must be a non-empty list of {', '.join(known)}; got {self.arms!r}.")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must not repeat a name; got {self.arms!r}.")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed.")
        for name in ("num_train", "num_eval", "eval_k", "eval_max_new_tokens", "parallel", "threads_per_run"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}.")
        for name in ("pass_k", "pass_k_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}.")
        if self.task != "chain" and self.eval_dataset is None:
            raise ValueError(f"task={self.task!r} needs eval_dataset (a bundled name or file held out from it).")
        if self.quick:  # every stage, small
            self.seeds, self.num_train, self.num_eval, self.eval_k = self.seeds[:1], 2000, 24, 2
            self.sft_steps = min(self.sft_steps, 60)
            self.pass_k, self.pass_k_problems = min(self.pass_k, 4), 8

    def arm_fields(self, arm: str) -> dict:
        """The forking_trl fields that define `arm` (forking_mode, forking_ratio and entropy_method always)."""
        return {**ARM_BASE, **ARMS.get(arm, {}), **(self.arm_configs or {}).get(arm, {})}


# --quick: GRPO flags appended to the command line (flags override the YAML)
QUICK_FLAGS = ["--max_steps", "3", "--per_device_train_batch_size", "16", "--num_generations", "4"]


def make_parser():
    """`TrlParser` over the ablation's arguments and `ForkingGRPOConfig` (`--config recipe.yaml`; flags override)."""
    from trl import TrlParser

    from .config import ForkingGRPOConfig

    return TrlParser((AblationArguments, ForkingGRPOConfig))


def arm_flags(overrides: dict) -> list[str]:
    """`--field value` for each field set to a value (booleans as true/false); a `None` (YAML/JSON `null`) has no
    flag (the parser would read the string 'None'): it is `unset_fields`' and set after parsing (`parse_run`)."""
    out = []
    for name, value in overrides.items():
        if value is not None:
            out += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def unset_fields(overrides: dict) -> list[str]:
    """The fields an arm sets to `None` (`null`)."""
    return [name for name, value in overrides.items() if value is None]


def parse_run(flags: list[str], unset: list[str] = ()):
    """(AblationArguments, ForkingGRPOConfig) of one run's command line, with the `unset` fields set to None and the
    config validated again: how every run and `check_arms` read an arm."""
    ab, args = make_parser().parse_args_and_config(flags)
    for name in unset:
        setattr(args, name, None)
    if unset:
        args.validate()
    return ab, args


def run_flags(
    argv: list[str], quick: bool, arm: str, seed: int, output_dir: Path, overrides: dict | None = None
) -> list[str]:
    """The command line of one run: the experiment's, then what differs between runs (flags override the YAML):
    the arm's fields (`overrides`, by default the built-in arm's), the seed and the directory."""
    overrides = {**ARM_BASE, **ARMS[arm]} if overrides is None else overrides
    return [
        *argv,
        *(QUICK_FLAGS if quick else []),
        *arm_flags(overrides),
        *("--seed", str(seed)),
        *("--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none"),
        *("--disable_tqdm", "true", "--forking_log_top_tokens", "0"),
    ]


# ------------------------------------------------------------------------------------------------------------------
# data and the start model


def task_data(ab: AblationArguments) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each `prompt` + `solution`; held-out problems never appear in training."""
    from .data import load_math_dataset, synthetic_chain

    if ab.task == "chain":
        train = synthetic_chain(ab.num_train, seed=1, max_operand=ab.max_operand)
        seen = {r["prompt"][0]["content"] for r in train}
        pool = synthetic_chain(20 * ab.num_eval, seed=2, max_operand=ab.max_operand)
        held = [r for r in pool if r["prompt"][0]["content"] not in seen][: ab.num_eval]
        return train, held
    train = list(load_math_dataset(ab.task, limit=ab.num_train))
    seen = {json.dumps(r["prompt"]) for r in train}
    pool = load_math_dataset(ab.eval_dataset)
    if ab.num_eval < len(pool):
        pool = pool.shuffle(seed=1)  # the order `limit` would give
    held, dropped = [], 0
    for row in pool:  # one pass, stopping once num_eval unseen problems are found
        if json.dumps(row["prompt"]) in seen:
            dropped += 1
        else:
            held.append(row)
            if len(held) == ab.num_eval:
                break
    if not held:
        raise ValueError(
            f"no held-out problem is left: every problem of eval_dataset={ab.eval_dataset!r} is in the training set "
            f"(task={ab.task!r}, num_train={ab.num_train}). Hold out another set, or lower num_train."
        )
    if dropped:
        print(
            f"held-out set: dropped {dropped} problem(s) of {ab.eval_dataset!r} that are in the training set; "
            f"{len(held)} remain",
            flush=True,
        )
    return train, held


def sft_warm_start(base: Path, out: Path, rows: list[dict], *, steps: int, lr: float, batch_size: int, seed: int):
    """Supervised warm start on worked solutions (loss on the completion tokens only); reused when `out` exists.

    Runs in one torch thread whatever the caller's setting: how a CPU kernel splits its work over threads changes
    the last bits of its sums, and 800 steps turn those into another start model (3 threads differed from 1 here).
    """
    from .tiny import torch_threads

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
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
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


# the tiny start model of the recipes' settings (its start-settings.json), built by sft_warm_start on this project's
# machine: shipped so that every machine starts from the same weights (bundled_data/README.md)
BUNDLED_START_MODEL = Path(__file__).resolve().parent / "bundled_data" / "start_model"
# what the tiny start model is built from: recorded beside it, and compared when an output directory is reused
START_SETTINGS = (
    *("task", "num_train", "max_operand", "tiny_hidden_size", "tiny_num_layers"),
    *("sft_steps", "sft_learning_rate", "sft_batch_size"),
)


def start_model(ab: AblationArguments, out: Path, train: list[dict]) -> str:
    """The start model: `ab.start_model`; or the tiny Qwen3 of `START_SETTINGS`, the shipped one when those are its
    settings (`ab.bundled_start_model`), else warm-started in `out`. What is in `out` is reused only when it has the
    same settings and origin (recorded in `out/start-settings.json`); else it is replaced, with a message."""
    if ab.start_model is not None:
        return ab.start_model
    import shutil

    from .tiny import build_tiny_model

    settings = {name: getattr(ab, name) for name in START_SETTINGS}
    shipped = ab.bundled_start_model and settings == json.loads(
        (BUNDLED_START_MODEL / "start-settings.json").read_text()
    )
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
        shutil.copytree(
            BUNDLED_START_MODEL, model, ignore=shutil.ignore_patterns("start-settings.json"), dirs_exist_ok=True
        )
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
    """Held-out accuracy and entropy pattern of a model; with the start model's samples and entropies, the overlap
    of its top-20% positions with the start model's (teacher forced on the start model's completions)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .analysis import entropy_summary, overlap_summary, score_entropies
    from .evaluation import evaluate, sample_pass_at_k

    torch.manual_seed(1234)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device).eval()
    ev = evaluate(
        model, tokenizer, held, k=ab.eval_k, max_new_tokens=ab.eval_max_new_tokens, batch_size=ab.eval_batch_size
    )
    scored = score_entropies(model, tokenizer, ev.samples, batch_size=ab.eval_batch_size)
    summary = entropy_summary(scored)
    result = {
        "accuracy": ev.as_dict(),
        "entropy": {key: summary[key] for key in ("num_tokens", "mean_entropy", "percentiles", "share_below_0.01")},
    }
    if ab.pass_k:
        problems = held[: ab.pass_k_problems or len(held)]
        result["pass_at_k"] = sample_pass_at_k(
            model,
            tokenizer,
            problems,
            n=ab.pass_k,
            max_new_tokens=ab.eval_max_new_tokens,
            batch_size=ab.eval_batch_size,
        )
    if start_samples is not None:
        on_start = score_entropies(model, tokenizer, start_samples, batch_size=ab.eval_batch_size)
        overlap = overlap_summary(start_scored, on_start, ratio=0.2)
        result["overlap"] = {key: overlap[key] for key in ("overlap", "spearman", "num_tokens")}
    return result, ev, scored


# ------------------------------------------------------------------------------------------------------------------
# one run (in its own process)


def run_arm(spec: dict) -> dict:
    """Train one (arm, seed) from the start model and measure it; `spec` as written by `run_ablation`."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from . import rewards
    from .analysis import ScoredCompletion
    from .trainer import ForkingGRPOTrainer

    torch.set_num_threads(spec["threads"])
    ab, args = parse_run(spec["argv"], spec.get("unset", []))
    train, held = task_data(ab)
    history: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                history.append({"step": state.global_step, **{k: logs[k] for k in TRACKED if k in logs}})

    started = time.time()
    trainer = ForkingGRPOTrainer(
        spec["start_model"],
        [getattr(rewards, name) for name in REWARD_NAMES],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "solution": r["solution"]} for r in train]),
        processing_class=AutoTokenizer.from_pretrained(spec["start_model"]),
        callbacks=[Record()],
    )
    trainer.train()
    final = Path(spec["output_dir"]) / "final"
    trainer.save_model(str(final))
    train_seconds = time.time() - started
    start = json.loads(Path(spec["start_file"]).read_text())
    start_samples = [tuple(s) for s in start["samples"]]
    start_scored = [ScoredCompletion(**s) for s in start["scored"]]
    result, _, _ = measure(str(final), ab, held, start_samples, start_scored)
    result.update(arm=spec["arm"], seed=spec["seed"], history=history, train_seconds=round(train_seconds, 1))
    return result


# ------------------------------------------------------------------------------------------------------------------
# the whole experiment


class RunsFailed(RuntimeError):
    """Some runs failed; the results of those that finished are written (and name the failed ones)."""


def run_ablation(argv: list[str]) -> dict:
    """Run every stage of the experiment given by a command line (`--config recipe.yaml`, flags, `--output_dir`)."""
    from tqdm.auto import tqdm

    from .analysis import plot_histogram, write_html
    from .tiny import torch_threads

    started = time.time()
    ab, training_args = make_parser().parse_args_and_config(argv)
    out = Path(training_args.output_dir)
    check_arms(ab, argv, out)  # every arm's command line parses and validates, before anything trains
    out.mkdir(parents=True, exist_ok=True)
    train, held = task_data(ab)
    model_path = start_model(ab, out, train)
    print(f"start model: {model_path}; measuring it on {len(held)} held-out problems", flush=True)
    with torch_threads(ab.threads_per_run):  # as each run measures itself: the same numbers on any core count
        start, ev, scored = measure(model_path, ab, held)
    summary = {**start["entropy"], "top_ratio": 0.2}
    plot_histogram(scored, {**summary, "top_threshold": _top_threshold(scored)}, out / "start_entropy_histogram.png")
    write_html(scored, {**summary, "top_threshold": _top_threshold(scored)}, out / "start_tokens.html", 12)
    start_file = out / "start.json"
    start_file.write_text(
        json.dumps({"samples": ev.samples, "scored": [dataclasses.asdict(s) for s in scored]}, ensure_ascii=False)
    )
    print(_start_line(start), flush=True)

    runs = [(arm, seed) for seed in ab.seeds for arm in ab.arms]  # seed-major: early results cover every arm
    results: dict[str, list[dict]] = {arm: [] for arm in ab.arms}
    failed: list[dict] = []
    pending: list[tuple[str, int, subprocess.Popen, Path]] = []
    bar = tqdm(total=len(runs), desc="runs (arm x seed)")
    queue = list(runs)
    while queue or pending:
        while queue and len(pending) < ab.parallel:
            arm, seed = queue.pop(0)
            pending.append((arm, seed, *_launch(arm, seed, ab, argv, out, model_path, start_file)))
        time.sleep(0.5)
        for item in list(pending):
            arm, seed, process, result_file = item
            if process.poll() is None:
                continue
            pending.remove(item)
            bar.update(1)
            if process.returncode != 0 or not result_file.exists():
                log_file = out / "runs" / f"{arm}-seed{seed}" / "log.txt"
                tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
                failed.append({"arm": arm, "seed": seed, "exit": process.returncode, "log": str(log_file)})
                bar.write(
                    f"{arm:>6} seed {seed}: FAILED (exit {process.returncode}); the other runs go on. "
                    f"End of {log_file}:\n{tail}"
                )
                continue
            result = json.loads(result_file.read_text())
            results[arm].append(result)
            acc = result["accuracy"]
            bar.write(
                f"{arm:>6} seed {seed}: greedy {100 * acc['greedy']:5.1f}%  avg@{acc['k']} "
                f"{100 * acc['sampled']:5.1f}%  overlap {100 * result['overlap']['overlap']:5.1f}%  "
                f"({result['train_seconds']:.0f} s)"
            )
    bar.close()
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
        "arms": {arm: _arm_summary(results[arm]) for arm in ab.arms if results[arm]},
        "failed_runs": failed,
        "wall_seconds": round(time.time() - started, 1),
    }
    write_results(report, out)
    if failed:
        names = ", ".join(f"{f['arm']} seed {f['seed']} (exit {f['exit']}, log {f['log']})" for f in failed)
        raise RunsFailed(
            f"{len(failed)} of {len(runs)} runs failed: {names}. The results of the {len(runs) - len(failed)} that "
            f"finished are in {out / 'results.md'}."
        )
    return {**report, "output_dir": str(out)}


def check_arms(ab: AblationArguments, argv: list[str], out: Path) -> None:
    """Parse every arm's command line as its run will (`ForkingGRPOConfig` validates it); `ValueError` naming the arm
    and its fields otherwise."""
    import contextlib
    import io

    for arm in ab.arms:
        overrides = ab.arm_fields(arm)
        flags = run_flags(argv, ab.quick, arm, 0, out / "runs" / f"{arm}-check", overrides)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                _, args = parse_run(flags, unset_fields(overrides))
            _check_arm_fields(args, overrides)
        except (ValueError, SystemExit) as err:
            reason = stderr.getvalue().strip().splitlines()[-1:] or [str(err)]
            raise ValueError(f"arm {arm!r} {overrides} is not a valid configuration: {reason[0]}") from None
        if args.entropy_method == "kl_cov" and args.fully_on_policy():
            print(
                f"note: arm {arm!r} is KL-Cov on a fully on-policy recipe ({args.on_policy_reason()}): its penalty is "
                "0, so it trains as all tokens on the unclipped surrogate (which on-policy equals the clipped one).",
                flush=True,
            )


def _check_arm_fields(args, overrides: dict) -> None:
    """What the config validation cannot see: each field the arm sets arrives with its value, and a
    `dynamic_sampling_reward` names one of the reward functions the runs train with."""
    for name, value in overrides.items():
        got = getattr(args, name)
        same = got == value or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and got == float(value)
        )
        if not same:
            raise ValueError(f"{name}={value!r} arrived as {got!r} through the command line")
    reward = args.dynamic_sampling_reward
    if reward is not None and reward not in REWARD_NAMES:
        raise ValueError(
            f"dynamic_sampling_reward={reward!r} is not a reward function of the runs: "
            f"{', '.join(map(repr, REWARD_NAMES))} (or null for the total reward)"
        )


def _launch(arm, seed, ab, argv, out, model_path, start_file):
    run_dir = out / "runs" / f"{arm}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "arm": arm,
        "seed": seed,
        "argv": run_flags(argv, ab.quick, arm, seed, run_dir, ab.arm_fields(arm)),
        "unset": unset_fields(ab.arm_fields(arm)),
        "output_dir": str(run_dir),
        "start_model": model_path,
        "start_file": str(start_file),
        "threads": ab.threads_per_run,
    }
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(ab.threads_per_run), "MKL_NUM_THREADS": str(ab.threads_per_run)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    log = (run_dir / "log.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "forking_trl.ablation", str(run_dir / "spec.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return process, run_dir / "result.json"


def _top_threshold(scored) -> float:
    import torch

    from .selection import forking_mask

    values = torch.tensor([h for s in scored for h in s.entropies])
    return float(values[forking_mask(values, torch.ones_like(values, dtype=torch.bool), ratio=0.2)].min())


def _start_line(start: dict) -> str:
    acc, ent = start["accuracy"], start["entropy"]
    p = ent["percentiles"]
    return (
        f"start: greedy {100 * acc['greedy']:.1f}%, avg@{acc['k']} {100 * acc['sampled']:.1f}%; "
        f"{100 * ent['share_below_0.01']:.1f}% of tokens below 0.01 nats; p50 {p['p50']:.3f}, p80 {p['p80']:.3f}, "
        f"p95 {p['p95']:.3f} nats"
    )


def _mean_std(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(finite), "values": values}


def _arm_summary(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["seed"])
    return {
        "seeds": [r["seed"] for r in runs],
        "greedy": _mean_std([r["accuracy"]["greedy"] for r in runs]),
        "sampled": _mean_std([r["accuracy"]["sampled"] for r in runs]),
        "overlap": _mean_std([r["overlap"]["overlap"] for r in runs]),
        **({"pass_at_k": _pass_at_k_summary(runs)} if "pass_at_k" in runs[0] else {}),
        "final_entropy": {
            "share_below_0.01": _mean_std([r["entropy"]["share_below_0.01"] for r in runs]),
            **{q: _mean_std([r["entropy"]["percentiles"][q] for r in runs]) for q in ("p50", "p80", "p95")},
        },
        "runs": runs,
    }


def _pass_at_k_summary(runs: list[dict]) -> dict:
    ks = runs[0]["pass_at_k"]["pass_at_k"]
    return {k: _mean_std([r["pass_at_k"]["pass_at_k"][k] for r in runs]) for k in ks}


# ------------------------------------------------------------------------------------------------------------------
# outputs: plain functions of the report (a test calls them on a small one)


def write_results(report: dict, out: Path) -> None:
    """results.json, results.md, accuracy.png and entropy_training.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(results_markdown(report))
    plot_accuracy(report, out / "accuracy.png")
    plot_entropy_training(report, out / "entropy_training.png")
    if "pass_at_k" in report["start"]:
        plot_pass_at_k(report, out / "pass_at_k.png")


def _pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def results_markdown(report: dict) -> str:
    start, arms = report["start"], report["arms"]
    n_seeds = max((a["greedy"]["n"] for a in arms.values()), default=0)
    lines = [
        "# Forking-token ablation",
        "",
        f"Command: `{report['command']}`; {report.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        _start_line(start) + ".",
        "",
        f"Held-out accuracy after training, mean ± standard deviation over {n_seeds} seed(s); gain in points over the "
        "start model. Overlap: share of the start model's top-20% entropy positions that are top-20% for the trained "
        "model on the same completions.",
        "",
        f"| arm | greedy % | gain | avg@{start['accuracy']['k']} % | gain | overlap % | tokens < 0.01 nats after % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, a in arms.items():
        g, s = a["greedy"], a["sampled"]
        lines.append(
            f"| {arm} | {_pct(g)} | {100 * (g['mean'] - start['accuracy']['greedy']):+.1f} | {_pct(s)} | "
            f"{100 * (s['mean'] - start['accuracy']['sampled']):+.1f} | {_pct(a['overlap'])} | "
            f"{_pct(a['final_entropy']['share_below_0.01'])} |"
        )
    if "pass_at_k" in start:
        p = start["pass_at_k"]
        ks = list(p["pass_at_k"])
        lines += [
            "",
            f"pass@k at T = 1 on {p['num_problems']} held-out problems, {p['n']} samples each (unbiased estimator), "
            "mean ± standard deviation over seeds:",
            "",
            "| model | " + " | ".join(f"pass@{k} %" for k in ks) + " |",
            "|---|" + "---:|" * len(ks),
            "| start | " + " | ".join(f"{100 * p['pass_at_k'][k]:.1f}" for k in ks) + " |",
        ]
        for arm, a in arms.items():
            lines.append(f"| {arm} | " + " | ".join(_pct(a["pass_at_k"][k]) for k in ks) + " |")
    lines += ["", *verdicts(report), ""]
    if report.get("failed_runs"):
        lines += ["## Runs that failed (not in the tables above)", ""]
        lines += [f"- {f['arm']} seed {f['seed']}: exit {f['exit']}, log `{f['log']}`" for f in report["failed_runs"]]
        lines.append("")
    return "\n".join(lines)


def verdicts(report: dict) -> list[str]:
    """Plain sentences: does each arm differ from `all` by more than the seed spread (two standard errors of the
    difference of the means), in greedy accuracy and in sampled avg@k?"""
    arms = report["arms"]
    if "all" not in arms:
        return ["No `all` arm to compare with."]
    out = []
    measures = [(("greedy",), "greedy"), (("sampled",), "avg@k")]
    if "pass_at_k" in arms["all"]:
        ks = list(arms["all"]["pass_at_k"])
        measures += [(("pass_at_k", k), f"pass@{k}") for k in dict.fromkeys([ks[0], ks[-1]])]
    for arm, a in arms.items():
        if arm == "all":
            continue
        parts = []
        for path, name in measures:
            s, base = _lookup(a, path), _lookup(arms["all"], path)
            diff = 100 * (s["mean"] - base["mean"])
            if min(s["n"], base["n"]) < 2:
                parts.append(f"{name} {diff:+.1f} points (one seed: no spread to judge it by)")
                continue
            se2 = 200 * math.sqrt(s["std"] ** 2 / s["n"] + base["std"] ** 2 / base["n"])
            verdict = "exceeds the seed spread" if abs(diff) > se2 else "within the seed spread"
            parts.append(f"{name} {diff:+.1f} points (two standard errors {se2:.1f}: {verdict})")
        out.append(f"- {arm} vs all: " + "; ".join(parts) + ".")
    return out


def _lookup(d: dict, path: tuple):
    for key in path:
        d = d[key]
    return d


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict, path: Path) -> None:
    """Held-out accuracy per arm: each seed a dot, the mean a bar with ± std, the start model a line."""
    plt = _pyplot()
    arms, start = report["arms"], report["start"]["accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "greedy", "greedy"), (axes[1], "sampled", f"avg@{start['k']} at T = 1")):
        for i, (arm, a) in enumerate(arms.items()):
            stat = a[key]
            ax.bar(i, 100 * stat["mean"], yerr=100 * stat["std"], color=f"C{i}", alpha=0.5, capsize=4)
            values = [100 * v for v in stat["values"] if v is not None]
            ax.scatter([i] * len(values), values, color=f"C{i}", zorder=3, s=14)
        ax.axhline(100 * start[key], color="gray", linestyle="--", linewidth=1, label="start model")
        ax.set_xticks(range(len(arms)), list(arms))
        ax.set(title=f"Held-out accuracy, {title}", ylabel="% correct")
        ax.legend(loc="lower right")
    fig.suptitle("Policy gradient on which tokens? (dots: seeds; bars: mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pass_at_k(report: dict, path: Path) -> None:
    """pass@k against k per arm (line: mean over seeds; band: min to max), the start model dashed."""
    plt = _pyplot()
    start = report["start"]["pass_at_k"]
    ks = list(start["pass_at_k"])
    x = [int(k) for k in ks]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [100 * start["pass_at_k"][k] for k in ks], color="gray", linestyle="--", marker="o", label="start")
    for i, (arm, a) in enumerate(report["arms"].items()):
        stats = [a["pass_at_k"][k] for k in ks]
        ax.plot(x, [100 * s["mean"] for s in stats], color=f"C{i}", marker="o", markersize=3, label=arm)
        low = [100 * min(v for v in s["values"] if v is not None) for s in stats]
        high = [100 * max(v for v in s["values"] if v is not None) for s in stats]
        ax.fill_between(x, low, high, color=f"C{i}", alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, ks)
    ax.set(
        xlabel="k (samples drawn)",
        ylabel="pass@k, % of problems",
        title=f"pass@k at T = 1, {start['num_problems']} held-out problems, n = {start['n']}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rolling(values: list[float], window: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_entropy_training(report: dict, path: Path) -> None:
    """Entropy over training per arm (mean over seeds, band: min to max): mean, p80, and share below 0.01 nats."""
    plt = _pyplot()
    panels = [
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
        "Entropy of all completion tokens during training (rolling mean of 10 steps; line: mean over seeds; "
        "band: min to max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # one run: python -m forking_trl.ablation SPEC.json (started by run_ablation)
    spec_path = Path(sys.argv[1])
    outcome = run_arm(json.loads(spec_path.read_text()))
    (spec_path.parent / "result.json").write_text(json.dumps(outcome))
