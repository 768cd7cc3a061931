"""Train with branching rollouts under `accelerate launch` (the 2-process gloo and the ZeRO-3 tests): `--trainer
forking` (`ForkingGRPOTrainer`, top 20% and branching) or `plain` (`BranchingGRPOTrainer`).

Each process writes `rank{N}.json`: every branched round's completions (token ids), copied-prefix lengths and tree
parents, the `branching/*` metrics, the steps trained and whether the parameters moved.
"""

import argparse
import json
import os

import torch

from forking_trl import BranchingGRPOConfig, BranchingGRPOTrainer, ForkingGRPOConfig, ForkingGRPOTrainer

from _util import changed, length_reward, prompt_dataset, snapshot, trainer_args  # noqa: E402  (tests/ on PYTHONPATH)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--trainer", choices=["forking", "plain"], default="plain")
    parser.add_argument("--advantage", choices=["group", "tree"], default="group")
    parser.add_argument("--max_steps", type=int, default=2)
    cli = parser.parse_args()
    forking = cli.trainer == "forking"
    args = trainer_args(
        cli.output_dir,
        config_class=ForkingGRPOConfig if forking else BranchingGRPOConfig,
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=cli.max_steps,
        branching=True,
        branching_roots=2,
        branching_advantage=cli.advantage,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = (ForkingGRPOTrainer if forking else BranchingGRPOTrainer)(
        cli.model, length_reward, args=args, train_dataset=prompt_dataset()
    )
    rounds = []
    branched = trainer._branched_generation

    def record(prompt_ids, images, multimodal_fields, G):
        completions, logprobs = branched(prompt_ids, images, multimodal_fields, G)
        plan = trainer._branching_plan
        rounds.append({"completions": completions, "prefix": plan.prefix, "parents": [t.parent for t in plan.trees]})
        return completions, logprobs

    trainer._branched_generation = record
    before = snapshot(trainer.model)
    trainer.train()
    history = trainer.state.log_history
    keys = ("branching/generated_tokens_ratio", "branching/forks_per_root", "branching/distinct_answers")
    record_file = {
        "world_size": trainer.accelerator.num_processes,
        "deepspeed": trainer.is_deepspeed_enabled,
        "steps": trainer.state.global_step,
        "rounds": rounds,
        "metrics": {k: [e[k] for e in history if k in e] for k in keys},
        "changed": bool(changed(before, trainer.model)),
    }
    with open(os.path.join(cli.output_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(record_file, f)
    trainer.end_distributed()


if __name__ == "__main__":
    main()
