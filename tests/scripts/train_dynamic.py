"""Train a tiny ForkingGRPOTrainer with dynamic sampling under `accelerate launch` (the 2-process gloo test).

The reward is constant for the even prompts (uninformative groups) and varies within the group for the odd ones.
Each process writes `rank{N}.json`: the prompt numbers and advantages of every micro-batch it trained on, and the
dynamic-sampling metrics.
"""

import argparse
import json
import os

from forking_trl import ForkingGRPOTrainer

from _util import AdvantageSpy, half_constant_reward, prompt_dataset, trainer_args  # noqa: E402  (tests/ on PYTHONPATH)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--scope", default="micro_batch")
    cli = parser.parse_args()
    args = trainer_args(  # the suite's tiny settings, with 2 groups of 4 per process
        cli.output_dir,
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=3,
        forking_scope=cli.scope,
        dynamic_sampling=True,
    )
    trainer = ForkingGRPOTrainer(cli.model, half_constant_reward, args=args, train_dataset=prompt_dataset())
    spy = AdvantageSpy(trainer)
    trainer.train()
    history = trainer.state.log_history
    record = {
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
