"""Train a tiny ForkingGRPOTrainer under `accelerate launch`; used by the multi-process and ZeRO-3 tests.

Each process writes `<scope>/rank{N}.json` under the output dir for each `--scope` (several train one after another in
the same processes: one launch): the thresholds it used, its kept fractions, and how many parameters it held. With `--empty_rank R`, process R's completions are all padding (its completion mask is zeroed
after generation), so it takes part in the selection with zero valid tokens.
"""

import argparse
import json
import os

import torch

from forking_trl import ForkingGRPOConfig, ForkingGRPOTrainer

from _util import length_reward, prompt_dataset  # noqa: E402  (tests/ is on sys.path through PYTHONPATH)


class RecordingTrainer(ForkingGRPOTrainer):
    def __init__(self, *args, empty_rank=-1, **kwargs):
        super().__init__(*args, **kwargs)
        self.empty_rank = empty_rank
        self.thresholds = []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.accelerator.process_index == self.empty_rank:
            output["completion_mask"] = torch.zeros_like(output["completion_mask"])
        return output

    def _select(self, entropies, mask, per_sequence):
        selection = super()._select(entropies, mask, per_sequence)
        self.thresholds.append(selection.threshold.item())
        return selection


def train(model: str, output_dir: str, scope: str, empty_rank: int, max_steps: int):
    args = ForkingGRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=10,
        max_steps=max_steps,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        seed=0,
        forking_scope=scope,
        disable_tqdm=True,
        bf16=torch.cuda.is_available(),
    )
    trainer = RecordingTrainer(model, length_reward, args=args, train_dataset=prompt_dataset(), empty_rank=empty_rank)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.numel()}
    trainer.train()
    rank = trainer.accelerator.process_index
    record = {
        "world_size": trainer.accelerator.num_processes,
        "thresholds": trainer.thresholds,
        "kept_fraction": [
            e["forking/kept_fraction"] for e in trainer.state.log_history if "forking/kept_fraction" in e
        ],
        "deepspeed": trainer.is_deepspeed_enabled,
        "params_seen": len(before),
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--empty_rank", type=int, default=-1)
    parser.add_argument("--scope", nargs="+", default=["micro_batch"], help="one run per scope, in order")
    parser.add_argument("--max_steps", type=int, default=2)
    cli = parser.parse_args()
    for scope in cli.scope:
        last = train(cli.model, os.path.join(cli.output_dir, scope), scope, cli.empty_rank, cli.max_steps)
    last.end_distributed()  # without it a gloo rank may abort at exit


if __name__ == "__main__":
    main()
