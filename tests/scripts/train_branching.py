"""Train with branching rollouts under `accelerate launch` (the 2-process gloo and the ZeRO-3 tests), one run after
another in the same processes (one launch): `--runs plain:group forking:tree ...`, each `trainer:advantage` with
trainer `forking` (`ForkingGRPOTrainer`, top 20% and branching) or `plain` (`BranchingGRPOTrainer`) and advantage
`group` or `tree`.

Each process writes `<trainer>-<advantage>/rank{N}.json` for each run: every branched round's completions (token
ids), copied-prefix lengths and tree parents, the `branching/*` metrics, the steps trained and whether the parameters
moved.
"""

import argparse
import json
import os

import torch

from forking_trl import BranchingGRPOConfig, BranchingGRPOTrainer, ForkingGRPOConfig, ForkingGRPOTrainer

from _util import changed, length_reward, prompt_dataset, snapshot, trainer_args  # noqa: E402  (tests/ on PYTHONPATH)


def train(model: str, output_dir: str, kind: str, advantage: str, max_steps: int):
    forking = kind == "forking"
    args = trainer_args(
        output_dir,
        config_class=ForkingGRPOConfig if forking else BranchingGRPOConfig,
        per_device_train_batch_size=4,
        max_completion_length=10,
        max_steps=max_steps,
        branching=True,
        branching_roots=2,
        branching_advantage=advantage,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = (ForkingGRPOTrainer if forking else BranchingGRPOTrainer)(
        model, length_reward, args=args, train_dataset=prompt_dataset()
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
    with open(os.path.join(output_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(record_file, f)
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--runs", nargs="+", default=["plain:group"], help="trainer:advantage, in order")
    parser.add_argument("--max_steps", type=int, default=2)
    cli = parser.parse_args()
    for run in cli.runs:
        kind, advantage = run.split(":")
        last = train(cli.model, os.path.join(cli.output_dir, f"{kind}-{advantage}"), kind, advantage, cli.max_steps)
    last.end_distributed()


if __name__ == "__main__":
    main()
