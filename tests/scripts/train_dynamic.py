"""Train a tiny trainer with dynamic sampling under `accelerate launch` (the 2-process gloo test): `--trainer forking`
(`ForkingGRPOTrainer`) or `plain` (`DynamicSamplingGRPOTrainer`).

The reward is constant for the even prompts (uninformative groups) and varies within the group for the odd ones.
Each process writes `rank{N}.json`: the prompt numbers and advantages of every micro-batch it trained on, and the
dynamic-sampling metrics.
"""

import argparse
import json
import os

from forking_trl import DynamicSamplingGRPOConfig, DynamicSamplingGRPOTrainer, ForkingGRPOConfig, ForkingGRPOTrainer

from _util import AdvantageSpy, half_constant_reward, prompt_dataset, trainer_args  # noqa: E402  (tests/ on PYTHONPATH)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--scope", default="micro_batch")
    parser.add_argument("--trainer", choices=["forking", "plain"], default="forking")
    parser.add_argument("--iterable", action="store_true", help="train on a datasets.IterableDataset (a stream)")
    cli = parser.parse_args()
    forking = cli.trainer == "forking"
    args = trainer_args(  # the suite's tiny settings, with 2 groups of 4 per process
        cli.output_dir,
        config_class=ForkingGRPOConfig if forking else DynamicSamplingGRPOConfig,
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=3,
        dynamic_sampling=True,
        **(dict(forking_scope=cli.scope) if forking else {}),
    )
    trainer_class = ForkingGRPOTrainer if forking else DynamicSamplingGRPOTrainer
    dataset = prompt_dataset()
    if cli.iterable:
        from datasets import IterableDataset

        rows = list(dataset)
        dataset = IterableDataset.from_generator(lambda: iter(rows))
    trainer = trainer_class(cli.model, half_constant_reward, args=args, train_dataset=dataset)
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
    with open(os.path.join(cli.output_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(record, f)
    trainer.end_distributed()  # without it a gloo rank may abort at exit


if __name__ == "__main__":
    main()
