"""One run of an experiment, as a job: train one (arm, seed) from the start model and measure it."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .arguments import TRACKED, parse_run, run_flags, unset_fields
from .jobs import spec_key
from .processes import launch
from .start import measure


def run_spec(ab, argv: list[str], arm: str, seed: int, out: Path, start_model: str, checksum: str) -> dict:
    """What one run is: its command line (the experiment's, then the arm's fields, seed and directory), the fields it
    unsets, its settings as parsed from those (`identity`), its threads and processes, and the start model with its
    checksum (`spec_key` hashes what decides the result)."""
    run_dir = out / "runs" / f"{arm}-seed{seed}"
    overrides = ab.arm_fields(arm)
    flags, unset = run_flags(argv, ab.quick, arm, seed, run_dir, overrides), unset_fields(overrides)
    run_ab, run_args = parse_run(flags, unset)
    if run_args.prompt_template is not None:  # training would use it, the measurements the model's own format
        raise ValueError(
            f"prompt_template={run_args.prompt_template!r}: the runner trains and measures every run with the start "
            "model's own format (its chat template, or forking_trl.templates.PLAIN_TEMPLATE without one); remove "
            "prompt_template from the recipe."
        )
    experiment_only = {"arms", "arm_configs", "seeds", "parallel", "launcher", "rerun", "job_timeout_min"}
    identity = {
        "training": run_args.to_dict(),
        "experiment": {
            k: v
            for k, v in dataclasses.asdict(run_ab).items()
            if k not in experiment_only and not k.startswith("slurm_")
        },
    }
    return {
        "arm": arm,
        "seed": seed,
        "argv": flags,
        "unset": unset,
        "identity": identity,
        "output_dir": str(run_dir),
        "start_model": start_model,
        "start_checksum": checksum,
        "start_file": str(out / "start.json"),
        "threads": ab.threads_per_run,
        "processes": ab.processes_per_run,
        "accelerate_config": ab.accelerate_config,
    }


def run_job(spec: dict) -> dict:
    """One run as a job (what the launcher executes): in this process, or under `accelerate launch` with
    `processes` > 1 (the recipe's `accelerate_config`, else `--multi_gpu`; on a machine without GPUs, CPU processes
    over gloo). Writes `spec.json` and `result.json` (with the `spec_key` resume compares) and returns the result.
    A launched run's processes end with this one, however it ends (`forking_trl.ablation.processes`)."""
    run_dir = Path(spec["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    result_file = run_dir / "result.json"
    result_file.unlink(missing_ok=True)
    if spec["processes"] > 1:
        import torch

        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(spec["processes"])]
        env = dict(os.environ)
        if spec.get("accelerate_config"):
            command += ["--config_file", spec["accelerate_config"]]
        else:
            command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
        launch([*command, "-m", "forking_trl.ablation", str(spec_file)], env, marker=str(spec_file))
        return json.loads(result_file.read_text())
    return write_result(spec, run_arm(spec))


def write_result(spec: dict, result: dict) -> dict:
    """`result.json` of a run: its result, the `spec_key` it was made for, and where it ran."""
    result = {**result, "spec_key": spec_key(spec), "devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    path = Path(spec["output_dir"]) / "result.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(result))
    partial.replace(path)  # whole or absent: an interrupted write is no result
    return result


def save_final(trainer, final: Path) -> None:
    """The trained model as a plain checkpoint in `final` (what `measure` loads): on the main process (ZeRO-3:
    gathered); a LoRA adapter merged into its base model first."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "merge_and_unload"):
        trainer.save_model(str(final))
        return
    if trainer.accelerator.is_main_process:  # LoRA (never under ZeRO-3: AblationArguments refuses it)
        model.merge_and_unload().save_pretrained(str(final))
        trainer.processing_class.save_pretrained(str(final))
    trainer.accelerator.wait_for_everyone()


def run_arm(spec: dict) -> dict | None:
    """Train one (arm, seed) from the start model and measure it (`spec` from `run_spec`); under a launch of
    several processes every process trains, the main one measures and returns the result, the others None."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from ..analysis import ScoredCompletion
    from ..trainer import ForkingGRPOTrainer

    torch.set_num_threads(spec["threads"])
    ab, args = parse_run(spec["argv"], spec.get("unset", []))
    task = ab.make_task()
    train, held = task.split(ab.num_train, ab.num_eval)  # as task_data(ab)
    history: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                history.append({"step": state.global_step, **{k: logs[k] for k in TRACKED if k in logs}})

    started = time.time()
    trainer = ForkingGRPOTrainer(
        spec["start_model"],
        task.reward_funcs(),
        args=args,
        train_dataset=Dataset.from_list(task.training_rows(train)),
        processing_class=AutoTokenizer.from_pretrained(spec["start_model"]),
        callbacks=[Record()],
        peft_config=ab.peft_config(),
    )
    trainer.train()
    final = Path(spec["output_dir"]) / "final"
    save_final(trainer, final)
    train_seconds = time.time() - started
    generated = trainer.generated_tokens_total()  # every process's
    main = trainer.accelerator.is_main_process
    if trainer.accelerator.num_processes > 1:
        trainer.end_distributed()  # the measurement is the main process's alone
    if not main:
        return None
    start = json.loads(Path(spec["start_file"]).read_text())
    start_samples = [tuple(s) for s in start["samples"]]
    start_scored = [ScoredCompletion(**s) for s in start["scored"]]
    result, _, _ = measure(str(final), ab, held, start_samples, start_scored)
    result.update(arm=spec["arm"], seed=spec["seed"], history=history, train_seconds=round(train_seconds, 1))
    result.update(generated_tokens=generated)  # completion tokens sampled in training (a branch: its continuation)
    result.update(train_started=started, train_finished=started + train_seconds)  # wall clock, seconds since epoch
    return result
