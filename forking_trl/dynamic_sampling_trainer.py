"""DAPO's dynamic sampling on TRL's `GRPOTrainer`: `DynamicSamplingMixin` and `DynamicSamplingGRPOTrainer`.

The decisions (which groups are informative, which rows to take, how to stack rounds) are the pure functions of
`forking_trl.dynamic_sampling`; this module holds the generation rounds, the stream of further prompts and their
checkpoint state. `ForkingGRPOTrainer` composes the mixin; `DynamicSamplingGRPOTrainer` is it on plain GRPO.

TRL hooks (`trl>=1.16,<1.17`; pinned in `tests/test_trl_contract.py`):

- `_generate_and_score_completions(inputs)`: while training, generation rounds of TRL's own
  `_generate_and_score_completions` (one round: `_generate_round`, which a subclass may wrap) until every process
  holds as many informative groups as the batch has, then one batch of exactly those groups, shaped as TRL's output
  (`num_items_in_batch` recounted). It runs before TRL's shuffle and split into micro-batches.
- `_calculate_rewards`: remembers the rewards of every process, as TRL gathers them, for the decision.
- `_save_rng_state(output_dir)` and `train(resume_from_checkpoint)`: `forking_dynamic_sampling.json` in each
  checkpoint (where the stream of further prompts stood), restored on resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap

import datasets
import torch
from torch.utils.data import IterableDataset
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.grpo_trainer import RepeatSampler
from trl.trainer.utils import repeat_iterable_dataset

from .dynamic_sampling import (
    NORMALIZED_SPREAD_TOLERANCE,
    fill_groups,
    group_rows,
    informative_groups,
    stack_rows,
    take_groups,
    training_rewards,
)
from .dynamic_sampling_config import DynamicSamplingGRPOConfig
from .extension import TrainerExtension

logger = logging.getLogger(__name__)

DYNAMIC_SAMPLING_STATE_NAME = "forking_dynamic_sampling.json"  # in each checkpoint: where the prompt stream stood


class DynamicSamplingMixin(TrainerExtension):
    """Dynamic sampling for a `GRPOTrainer` subclass: `class MyTrainer(DynamicSamplingMixin, GRPOTrainer)`.

    `args` is promoted to `config_class` (`DynamicSamplingGRPOConfig`, or a subclass's own config) and validated
    before TRL's `__init__` runs; a plain `GRPOConfig` keeps every value it holds. Metrics, logged while training with `dynamic_sampling=True`:
    `dynamic_sampling/rounds` (generation rounds made for the generation batch), `dynamic_sampling/kept_groups`
    (informative share of all groups generated in them, all processes) and `dynamic_sampling/filled_groups` (share
    of the batch completed with uninformative groups at the round limit; 0 normally).
    """

    config_class = DynamicSamplingGRPOConfig  # what `args` is promoted to (a subclass's trainer: its own config)

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)  # TrainerExtension promotes `args`
        args = self.args
        self._dynamic_rewards_per_func: torch.Tensor | None = None  # (N_all, F): the last round's, as TRL gathered
        self._dynamic_iterator = None
        self._dynamic_passes = 0  # passes over the dataset by the further-prompt stream (each its own order)
        self._dynamic_drawn = 0  # batches drawn in the current pass; with the passes, saved in checkpoints
        self._dynamic_skip = 0  # on resume: batches of the current pass already drawn before the checkpoint
        self._dynamic_warned = False
        name = args.dynamic_sampling_reward
        if name is not None and name not in self.reward_func_names:
            raise ValueError(
                f"dynamic_sampling_reward={name!r} is not one of this trainer's reward functions: "
                f"{', '.join(map(repr, self.reward_func_names))} (or None for the total reward)."
            )
        if (
            args.dynamic_sampling
            and isinstance(self.train_dataset, IterableDataset)
            and not isinstance(self.train_dataset, datasets.IterableDataset)
        ):  # TRL itself takes a datasets.Dataset or datasets.IterableDataset only; say so for a bare torch stream
            raise ValueError(
                "dynamic_sampling draws further prompts from a datasets.Dataset (by index) or a "
                f"datasets.IterableDataset (as a stream); got a {type(self.train_dataset).__name__}."
            )

    # ------------------------------------------------------------------------------------------------------------
    # hooks

    def _generate_and_score_completions(self, inputs):
        if self.args.dynamic_sampling and self.model.training:
            return self._dynamic_sampling(inputs)
        return self._generate_round(inputs)

    def _generate_round(self, inputs):
        """One TRL generation round (`GRPOTrainer._generate_and_score_completions`); a subclass may wrap it."""
        return super()._generate_and_score_completions(inputs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._dynamic_rewards_per_func = rewards_per_func  # (N_all_processes, num_funcs): dynamic sampling reads it
        return rewards_per_func

    # ------------------------------------------------------------------------------------------------------------
    # the rounds: the decisions are forking_trl.dynamic_sampling's pure functions

    def _dynamic_sampling(self, inputs: list[dict]) -> dict:
        """Generate rounds until every process holds `len(inputs) / G` informative groups (or the round limit), and
        return one generation batch of exactly those groups, shaped as TRL's output."""
        G = self.num_generations
        needed = len(inputs) // G  # local groups per generation batch (whole groups: checked by the config)
        parts: list[tuple[dict, torch.Tensor]] = []  # (round output, local rows taken)
        have = rounds = 0
        totals = torch.zeros(2, device=self.accelerator.device)  # groups generated, informative, on all processes
        while True:
            rounds += 1
            output = self._generate_round(inputs)
            if rounds == 1:
                self._check_stackable(output)
            informative = self._informative_local_groups(len(inputs))  # (needed,) bool
            taken = take_groups(informative, needed - have)
            parts.append((output, group_rows(taken, G)))
            have += len(taken)
            # every process makes the same decision, so all take part in the same collectives each round
            status = torch.tensor([len(informative), informative.sum(), have >= needed], device=totals.device)
            status = self.accelerator.gather(status.float().unsqueeze(0)).view(-1, 3)
            totals += status[:, :2].sum(dim=0)
            if bool(status[:, 2].all()) or rounds >= self.args.dynamic_sampling_max_rounds:
                break
            inputs = self._next_dynamic_sampling_batch()
        filled = 0
        if have < needed:  # round limit: complete with the last round's uninformative groups (advantage 0)
            extra = fill_groups(informative, taken, needed - have)
            parts.append((output, group_rows(extra, G)))
            filled = len(extra)
        batch = stack_rows(
            [(part, rows) for part, rows in parts if len(rows)],
            left_padded=("prompt_ids", "prompt_mask"),
            pad_values=dict.fromkeys(("prompt_ids", "completion_ids"), self._pad_token_id()),
        )
        batch["num_items_in_batch"] = self.accelerator.gather(loss_mask(batch).sum()).sum()  # recounted, as TRL
        self._log_dynamic_sampling(rounds, totals, filled, needed)
        return batch

    @staticmethod
    def _check_stackable(output: dict) -> None:
        """Rounds are combined row by row: every tensor must be per sample, or `num_items_in_batch` (recounted)."""
        odd = [
            k for k, v in output.items() if isinstance(v, torch.Tensor) and v.dim() == 0 and k != "num_items_in_batch"
        ]
        odd += [k for k in ("pixel_values", "image_grid_thw", "num_images", "num_tiles") if k in output]
        if odd:
            raise ValueError(
                f"dynamic_sampling combines generation rounds row by row and cannot combine {odd}; it supports text "
                "models. Set dynamic_sampling=False."
            )

    def _pad_token_id(self) -> int:
        return getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id

    def _informative_local_groups(self, local_size: int) -> torch.Tensor:
        """`(local_size / G,)` bool: this process's groups of the round just generated that have a reward spread."""
        per_func = self._dynamic_rewards_per_func  # (N_all, F), gathered by TRL
        aggregation = self.args.multi_objective_aggregation
        tolerance = 0.0  # raw rewards: any spread counts (advantages are scaled by the group's std)
        if self.args.dynamic_sampling_reward is not None:  # one function's reward (DAPO: accuracy)
            rewards = per_func[:, self.reward_func_names.index(self.args.dynamic_sampling_reward)]
        else:  # what TRL's advantage uses: the weighted total, or the weighted sum of per-group normalised rewards
            rewards = training_rewards(per_func, self.reward_weights, self.num_generations, aggregation)
            if aggregation == "normalize_then_sum":
                tolerance = NORMALIZED_SPREAD_TOLERANCE
        start = self.accelerator.process_index * local_size
        return informative_groups(rewards[start : start + local_size], self.num_generations, tolerance)

    def _log_dynamic_sampling(self, rounds: int, totals: torch.Tensor, filled: int, needed: int) -> None:
        filled_all = self.accelerator.reduce(torch.tensor(float(filled), device=totals.device), reduction="sum").item()
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/rounds"].append(float(rounds))
        metrics["dynamic_sampling/kept_groups"].append((totals[1] / totals[0].clamp(min=1)).item())
        metrics["dynamic_sampling/filled_groups"].append(filled_all / (needed * self.accelerator.num_processes))
        if filled_all and not self._dynamic_warned:
            logger.warning(
                "forking_trl: dynamic sampling reached dynamic_sampling_max_rounds=%d with too few informative "
                "groups; %d of the batch's %d groups are uninformative ones of the last round (advantage 0, no policy "
                "gradient). Logged as dynamic_sampling/filled_groups; said once. Raise the limit, or check the "
                "rewards and the data's difficulty.",
                self.args.dynamic_sampling_max_rounds,
                int(filled_all),
                needed * self.accelerator.num_processes,
            )
            self._dynamic_warned = True

    def _next_dynamic_sampling_batch(self) -> list[dict]:
        """The next local batch of further prompts: TRL's group layout (each prompt `G` times, whole groups per
        process), an order of its own, reshuffled each pass over the dataset."""
        while True:
            if self._dynamic_iterator is not None:
                try:
                    batch = next(self._dynamic_iterator)
                    self._dynamic_drawn += 1
                    if self._dynamic_skip:  # resuming: this batch was drawn before the checkpoint
                        self._dynamic_skip -= 1
                        continue
                    return batch
                except StopIteration:
                    self._dynamic_passes += 1
                    self._dynamic_drawn = self._dynamic_skip = 0
            self._dynamic_iterator = iter(self._further_prompt_loader(self.args.seed + 1 + self._dynamic_passes))

    def _further_prompt_loader(self, seed: int):
        """One pass of further prompts in TRL's group layout: a map-style dataset through `RepeatSampler` (a full
        permutation of its own), a `datasets.IterableDataset` as TRL streams it (`repeat_iterable_dataset`, after a
        buffered shuffle of its own when TRL shuffles); each process takes its slice of every batch."""
        prompts_per_batch = self.args.generation_batch_size // self.num_generations
        dataset, sampler_fn = self.train_dataset, None
        if isinstance(dataset, datasets.IterableDataset):
            if self.shuffle_dataset:
                dataset = dataset.shuffle(seed=seed)
            dataset = repeat_iterable_dataset(dataset, self.num_generations, prompts_per_batch, repeat_count=1)
        else:

            def sampler_fn(data):
                return RepeatSampler(
                    data_source=data,
                    mini_repeat_count=self.num_generations,
                    batch_size=prompts_per_batch,
                    repeat_count=1,
                    shuffle=True,
                    seed=seed,
                )

        return self._get_dataloader(
            dataset=dataset,
            description="Dynamic sampling",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=sampler_fn,
            is_training=True,
        )

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints: where the further-prompt stream stood travels with them

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # makes output_dir on every process
        if self.args.should_save and self.args.dynamic_sampling:  # the same on every process
            with open(os.path.join(output_dir, DYNAMIC_SAMPLING_STATE_NAME), "w") as f:
                json.dump({"passes": self._dynamic_passes, "drawn": self._dynamic_drawn}, f)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:  # as Trainer.train: the last checkpoint in output_dir (Trainer raises if none)
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            self._restore_checkpoint_state(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_checkpoint_state(self, checkpoint: str) -> None:
        """Restore what `_save_rng_state` added to `checkpoint` before TRL resumes from it; a subclass that saves more
        extends it (and calls this)."""
        stream_file = os.path.join(checkpoint, DYNAMIC_SAMPLING_STATE_NAME)
        if self.args.dynamic_sampling and os.path.isfile(stream_file):  # the further prompts go on where they were
            with open(stream_file) as f:
                stream = json.load(f)
            self._dynamic_iterator = None
            self._dynamic_passes, self._dynamic_drawn, self._dynamic_skip = stream["passes"], 0, stream["drawn"]
            self._warn_if_inside_a_generation_window(checkpoint)

    def _warn_if_inside_a_generation_window(self, checkpoint: str) -> None:
        """TRL keeps the generation batch it trains on for `steps_per_generation * num_iterations` micro-batches and
        does not checkpoint it: resuming inside that window regenerates it, which draws further prompts the
        uninterrupted run did not draw. The stream then cannot follow the uninterrupted run; say so."""
        state_file = os.path.join(checkpoint, "trainer_state.json")
        if not os.path.isfile(state_file):
            return
        with open(state_file) as f:
            step = json.load(f).get("global_step", 0)
        generate_every = self.args.generation_window
        if (step * self.args.gradient_accumulation_steps) % generate_every:
            logger.warning(
                "forking_trl: %s (step %d) is inside a generation window (a generation batch serves %d micro-batches: "
                "steps_per_generation=%d x num_iterations=%d); TRL regenerates it on resume, so dynamic sampling's "
                "further prompts from here on differ from those of the uninterrupted run. Checkpoints on a window "
                "boundary (every %d optimizer steps here) resume the stream exactly.",
                checkpoint,
                step,
                generate_every,
                self.args.steps_per_generation,
                self.num_iterations,
                generate_every // math.gcd(generate_every, self.args.gradient_accumulation_steps),
            )


class DynamicSamplingGRPOTrainer(DynamicSamplingMixin, GRPOTrainer):
    """`trl.GRPOTrainer` with DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, Sec. 3.2), and nothing else.

    Same constructor as `GRPOTrainer`. `args` may be a `DynamicSamplingGRPOConfig`, or a plain `GRPOConfig`, which is
    promoted with dynamic sampling on (`dynamic_sampling=True`, at most 10 rounds, the total reward decides). With
    `dynamic_sampling=False` it trains exactly as `GRPOTrainer`. Metrics: see `DynamicSamplingMixin`; checkpoints
    also hold `forking_dynamic_sampling.json`, so a resumed run draws the same further prompts as the uninterrupted
    one (for checkpoints on a generation boundary; resuming inside a generation window warns).
    """

    _tag_names = ["trl", "grpo", "dapo", "dynamic-sampling", "forking-trl"]
    _name = "GRPO with dynamic sampling"
    _paper = {
        "title": "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
        "id": "2503.14476",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{yu2025dapo,
                title        = {{DAPO: An Open-Source LLM Reinforcement Learning System at Scale}},
                author       = {Qiying Yu and others},
                year         = 2025,
                eprint       = {arXiv:2503.14476},
            }"""),
    }


def loss_mask(output: dict) -> torch.Tensor:
    """`(B, T)` tokens of a generation batch that count in the loss: the completion mask times TRL's tool mask."""
    mask = output["completion_mask"]
    return mask * output["tool_mask"] if "tool_mask" in output else mask
