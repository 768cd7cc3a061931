"""Train tiny trainers with dynamic sampling under `accelerate launch` (the 2-process gloo test), one after another
in the same processes (one launch, so the suite pays its start once): `--runs plain:micro_batch forking:batch ...`,
each `trainer:scope` with trainer `forking` (`ForkingGRPOTrainer`) or `plain` (`DynamicSamplingGRPOTrainer`) and
scope `micro_batch`, `batch` (the forking selection's) or `iterable` (a datasets.IterableDataset, a stream).

The reward is constant for the even prompts (uninformative groups) and varies within the group for the odd ones.
Each process writes `<trainer>-<scope>/rank{N}.json` for each run: the prompt numbers and advantages of every
micro-batch it trained on, and the dynamic-sampling metrics.
"""

import argparse
import json
import os

from forking_trl import DynamicSamplingGRPOConfig, DynamicSamplingGRPOTrainer, ForkingGRPOConfig, ForkingGRPOTrainer

from _util import AdvantageSpy, half_constant_reward, prompt_dataset, trainer_args  # noqa: E402  (tests/ on PYTHONPATH)


def train(model: str, output_dir: str, trainer: str, scope: str):
    forking = trainer == "forking"
    args = trainer_args(  # the suite's tiny settings, with 2 groups of 4 per process
        output_dir,
        config_class=ForkingGRPOConfig if forking else DynamicSamplingGRPOConfig,
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=3,
        dynamic_sampling=True,
        **(dict(forking_scope=scope) if forking and scope != "iterable" else {}),
    )
    trainer_class = ForkingGRPOTrainer if forking else DynamicSamplingGRPOTrainer
    dataset = prompt_dataset()
    if scope == "iterable":
        from datasets import IterableDataset

        rows = list(dataset)
        dataset = IterableDataset.from_generator(lambda: iter(rows))
    trainer = trainer_class(model, half_constant_reward, args=args, train_dataset=dataset)
    spy = AdvantageSpy(trainer)
    trainer.train()
    history = trainer.state.log_history
    record = {
        "trainer": type(trainer).__name__,
        "world_size": trainer.accelerator.num_processes,
        "seen": spy.seen,
        "rounds": [e["dynamic_sampling/rounds"] for e in history if "dynamic_sampling/rounds" in e],
        "kept_groups": [e["dynamic_sampling/kept_groups"] for e in history if "dynamic_sampling/kept_groups" in e],
        "steps": trainer.state.global_step,
    }
    with open(os.path.join(output_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(record, f)
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--runs", nargs="+", default=["forking:micro_batch"], help="trainer:scope, in order")
    cli = parser.parse_args()
    for run in cli.runs:
        trainer, scope = run.split(":")
        last = train(cli.model, os.path.join(cli.output_dir, f"{trainer}-{scope}"), trainer, scope)
    last.end_distributed()  # without it a gloo rank may abort at exit


if __name__ == "__main__":
    main()
