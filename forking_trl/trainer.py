"""`ForkingGRPOTrainer`: TRL's `GRPOTrainer` with the policy gradient restricted to forking tokens.

Thin glue over TRL's narrowest hooks (`trl>=1.16,<1.17`; `tests/test_trl_contract.py` fails loudly if they change):

- `get_high_entropy_mask(entropies, mask, threshold)`: TRL's `_compute_loss` multiplies its result into the
  per-token policy loss, before the KL term is added and before the loss is normalized by the completion mask.
  We return the forking selection there (as float weights when `forking_normalizer="kept"`), so unselected tokens
  get zero policy gradient while their KL term and the normalizer are untouched. TRL calls the hook only when
  `self.top_entropy_quantile < 1`, so the trainer sets that attribute below 1 for every mode.
- `compute_loss(model, inputs)`: remembers the micro-batch inputs, so the hook can read a mask that arrived with
  them (`forking_scope="batch"`), the completion ids (the kept-token counter), the advantages and old log-probs
  (the entropy methods). With `entropy_method="kl_cov"` it adds KL-Cov's per-token penalty to TRL's loss,
  normalised exactly as TRL normalises the per-token loss for the loss type (the one term the multiplicative hook
  cannot express; the normalisers are pinned in `tests/test_trl_contract.py`). KL-Cov also opens TRL's PPO clip
  (`self.epsilon_low = 1`, `self.epsilon_high = inf`: the reference trains on the unclipped surrogate).
- `_get_per_token_logps_and_entropies`: inside `compute_loss`, remembers the policy's per-token log-probs (with
  their graph) for the entropy methods and the covariance metrics; no extra forward.
- `_generate_and_score_completions` and `_get_per_token_logps_and_entropies`: with `forking_scope="batch"` only,
  the entropies of the whole generation batch are taken from TRL's old-log-prob pass (or one extra no-grad forward
  when TRL makes none), the selection is made once, and its mask rides with the inputs through TRL's shuffle and
  split into micro-batches.

- `_save_rng_state(output_dir)` and `train(resume_from_checkpoint)`: the forking fields, the random mode's
  generator and where dynamic sampling's further-prompt stream stood are saved beside TRL's RNG states in each
  checkpoint, and checked and restored on resume.

The entropies are TRL's: from the fused LM head, at the sampling temperature, of the current policy; no second pass
over the logits.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import textwrap
import time

import datasets
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.grpo_trainer import RepeatSampler

from .config import SEQUENCE_MEAN_LOSSES, ForkingGRPOConfig
from .credit import METHODS, CreditInputs, MethodTerms, token_covariance
from .dynamic_sampling import (
    NORMALIZED_SPREAD_TOLERANCE,
    fill_groups,
    group_rows,
    informative_groups,
    stack_rows,
    take_groups,
    training_rewards,
)
from .entropy import LOW_ENTROPY
from .selection import ForkingSelection, forking_select, percentiles

logger = logging.getLogger(__name__)

ENTROPY_PERCENTILES = (50, 80, 95)  # logged as entropy/p50, ... (nearest rank, all valid tokens of all processes)
FORKING_STATE_NAME = "forking_state.json"  # in each checkpoint: the forking fields of the run that saved it
DYNAMIC_SAMPLING_STATE_NAME = "forking_dynamic_sampling.json"  # and where dynamic sampling's prompt stream stood


class ForkingGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose policy gradient reaches only the selected (by default top-20% entropy) tokens.

    Same constructor as `GRPOTrainer`. `args` may be a `ForkingGRPOConfig`, or a plain `GRPOConfig`, which is
    promoted with the forking defaults (`forking_mode="top"`, `forking_ratio=0.2`); a plain config's
    `top_entropy_quantile < 1` becomes `forking_ratio`.

    Metrics (averaged by TRL's `log`): `forking/threshold`, `forking/kept_fraction`, `forking/entropy_kept`,
    `forking/entropy_dropped`, and `forking/nonfinite_tokens` when a valid token's entropy was NaN or inf; the
    entropy pattern of all valid completion tokens of all processes, `entropy/p50`, `entropy/p80`, `entropy/p95`
    (exact nearest-rank percentiles by radix select, about 8 KiB communicated each) and `entropy/share_below_0.01`,
    from the entropies the selection already has. TRL's own `entropy` metric stays the mean over all valid tokens.
    `cov/mean`, `cov/kept`, `cov/dropped`: the mean of cov_t = (A_t - mean A)(log pi_t - mean log pi) over those
    tokens (the covariance that drives entropy down when positive), from the step's own log-probs and advantages;
    with an `entropy_method`, its counts (`clip_cov/clipped_fraction`, `kl_cov/penalized_fraction`,
    `kl_cov/penalty`, `entropy_adv/shaping`, `entropy_adv/capped_fraction`).
    TRL's entropy bonus (`entropy_coef`, `use_adaptive_entropy`, logged as `entropy_coef`) acts on the kept tokens
    only, and its adaptive controller measures their entropy; the config refuses the combination unless
    `forking_kept_entropy_bonus=True`.

    Checkpoints also hold `forking_state.json` (the forking fields), the random mode's generator and, with dynamic
    sampling, where its stream of further prompts stood; resuming with a forking field changed logs a warning
    naming it.
    """

    _tag_names = ["trl", "grpo", "forking-trl", "forking-tokens"]
    _name = "Forking GRPO"
    _paper = {
        "title": "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for "
        "LLM Reasoning",
        "id": "2506.01939",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{wang2025beyond,
                title        = {{Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning}},
                author       = {Shenzhi Wang and Le Yu and Chang Gao and Chujie Zheng and Shixuan Liu and Rui Lu and Kai Dang and Xionghui Chen and Jianxin Yang and Zhenru Zhang and Yuqiong Liu and An Yang and Andrew Zhao and Yang Yue and Shiji Song and Bowen Yu and Gao Huang and Junyang Lin},
                year         = 2025,
                eprint       = {arXiv:2506.01939},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ForkingGRPOConfig(f"{name.split('/')[-1]}-ForkingGRPO")
        args = ForkingGRPOConfig.from_grpo_config(args)
        args.validate()  # again: fields may have been set after the config was built
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)

        # TRL applies `get_high_entropy_mask` only when this is below 1; our hook reads the forking_* fields instead.
        self.top_entropy_quantile = 0.0

        self._forking_inputs: dict | None = None  # the micro-batch `compute_loss` is working on
        self._forking_capture: bool = False  # batch scope: take entropies from TRL's old-log-prob pass
        self._forking_captured: torch.Tensor | None = None
        self._forking_warned_nonfinite = False
        self._forking_generator = torch.Generator(device=self.accelerator.device)
        self._forking_generator.manual_seed(args.seed + 1_000_003 * self.accelerator.process_index)
        self._kept_token_counts: collections.Counter[int] = collections.Counter()
        self._dynamic_rewards_per_func: torch.Tensor | None = None
        self._dynamic_iterator = None
        self._dynamic_passes = 0  # passes over the dataset by the further-prompt stream (each its own order)
        self._dynamic_drawn = 0  # batches drawn in the current pass; with the passes, saved in checkpoints
        self._dynamic_skip = 0  # on resume: batches of the current pass already drawn before the checkpoint
        self._dynamic_warned = False
        self._forking_logps: torch.Tensor | None = None  # (B, T) the policy's log-probs in compute_loss, with grad
        self._method_extra: torch.Tensor | None = None  # (B, T) KL-Cov's term, added to the loss by compute_loss
        if args.entropy_method == "kl_cov":
            # the reference trains KL-Cov on the unclipped surrogate -r A: open TRL's clip (read only by the loss and
            # the clip metrics; pinned in tests/test_trl_contract.py)
            self.epsilon_low, self.epsilon_high = 1.0, math.inf
            if args.fully_on_policy():
                logger.warning(
                    "forking_trl: entropy_method='kl_cov' on a fully on-policy run (num_iterations=1, "
                    "steps_per_generation=%d <= gradient_accumulation_steps=%d): log π_old is log π itself, so "
                    "KL-Cov's penalty |log π − log π_old| is 0 in value and gradient and the run trains plain GRPO "
                    "on the unclipped surrogate. Its penalty acts from the second optimizer step on each generation "
                    "batch: set steps_per_generation above gradient_accumulation_steps, or num_iterations > 1.",
                    args.steps_per_generation,
                    args.gradient_accumulation_steps,
                )
        name = args.dynamic_sampling_reward
        if name is not None and name not in self.reward_func_names:
            raise ValueError(
                f"dynamic_sampling_reward={name!r} is not one of this trainer's reward functions: "
                f"{', '.join(map(repr, self.reward_func_names))} (or None for the total reward)."
            )
        if args.dynamic_sampling and isinstance(self.train_dataset, (IterableDataset, datasets.IterableDataset)):
            raise ValueError(
                "dynamic_sampling draws further prompts by index, so it needs a map-style train_dataset "
                f"(a datasets.Dataset); got {type(self.train_dataset).__name__}. Set dynamic_sampling=False."
            )

    # ------------------------------------------------------------------------------------------------------------
    # hooks

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._forking_inputs = inputs
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._method_extra is not None:  # KL-Cov: L_t + extra_t, aggregated as TRL aggregated L_t
                loss = loss + self._aggregate_like_trl(self._method_extra, _loss_mask(inputs), inputs)
            return loss
        finally:
            self._forking_inputs = self._forking_logps = self._method_extra = None

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Per-token policy-gradient weights of the micro-batch: 0 for unselected tokens.

        Args:
            entropies: `(B, T)` entropies of the current policy at the sampling temperature (TRL's fused head).
            mask: `(B, T)` completion mask (times the tool mask); 0 for padding.
            threshold: TRL's `1 - top_entropy_quantile`, unused: the `forking_*` fields decide.

        Returns:
            `(B, T)` bool mask, or float weights with `forking_normalizer="kept"` or an `entropy_method`.
        """
        inputs = self._forking_inputs or {}
        if "forking_mask" in inputs:  # batch scope: selected once per generation batch, metrics logged then
            keep, scale = inputs["forking_mask"] & mask.bool(), inputs["forking_scale"]
        else:
            keep, scale = self._select_and_record(entropies, mask, inputs.get("completion_ids"))
        weights = self._policy_weights(keep, mask, scale)
        return self._apply_entropy_method(weights, keep, entropies, mask, inputs)

    def _apply_entropy_method(self, weights, keep, entropies, mask, inputs) -> torch.Tensor:
        """The entropy method's weight times `weights` (its extra term left for `compute_loss`), over the kept
        tokens of this micro-batch on this process, as the references; and the covariance metrics of every run."""
        logps = self._forking_logps
        if logps is None or "advantages" not in inputs:
            return weights
        old = inputs.get("old_per_token_logps")
        x = CreditInputs(
            logps=logps,
            old_logps=logps.detach() if old is None else old,  # as TRL: on-policy when it made no old pass
            advantages=inputs["advantages"],
            mask=mask,
            entropies=entropies,
            active=keep,
            covariance=token_covariance(logps, inputs["advantages"], mask),
        )
        terms = None
        if self.args.entropy_method != "none":
            terms = METHODS[self.args.entropy_method](x, **self._method_params())
            if terms.weight is not None:
                weights = weights * terms.weight
            self._method_extra = terms.extra
        self._log_covariance(x, terms)
        return weights

    def _method_params(self) -> dict:
        a = self.args
        if a.entropy_method == "clip_cov":
            return dict(
                ratio=a.clip_cov_ratio,
                lb=a.clip_cov_lb,
                ub=a.clip_cov_ub,
                epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high,
                delta=a.delta,
                generator=self._forking_generator,
            )
        if a.entropy_method == "kl_cov":
            return dict(ratio=a.kl_cov_ratio, coef=a.kl_cov_coef)
        return dict(alpha=a.entropy_adv_alpha, kappa=a.entropy_adv_kappa)

    def _aggregate_like_trl(self, term: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """A `(B, T)` per-token term normalised exactly as `GRPOTrainer._compute_loss` normalises the per-token loss
        of `self.loss_type` (the clipped-surrogate losses KL-Cov is defined for); pinned in the contract test."""
        term = term * mask
        training = self.model.training
        accumulation = self.current_gradient_accumulation_steps if training else 1.0
        if self.loss_type == "grpo":
            return (term.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return term.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return term.sum() / (term.size(0) * self.max_completion_length) / accumulation
        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if training:
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return term.sum() / normalizer
        if self.loss_type == "luspo":
            return term.sum(-1).mean() / accumulation
        raise ValueError(f"no extra per-token term for loss_type={self.loss_type!r}")  # refused by the config

    def _generate_and_score_completions(self, inputs):
        if self.args.dynamic_sampling and self.model.training:
            output = self._dynamic_sampling(inputs)
        else:
            output = self._generate_round(inputs)
        if self.args.forking_scope != "batch":
            return output

        # batch scope: select once over the generation batch actually trained on
        entropies = output.pop("forking_entropies", None)
        if entropies is None:
            entropies = self._generation_batch_entropies(output)
        # (B, T) bool and a 0-dim scale: TRL's shuffle and split carry both to every micro-batch
        output["forking_mask"], output["forking_scale"] = self._select_and_record(
            entropies, _loss_mask(output), output["completion_ids"]
        )
        return output

    def _generate_round(self, inputs):
        """One TRL generation round; with `forking_scope="batch"`, its entropies ride along as `forking_entropies`
        when TRL's old-log-prob pass gave them."""
        if self.args.forking_scope != "batch":
            return super()._generate_and_score_completions(inputs)
        reuses_old_logps = self._trl_computes_old_logps()
        self._forking_capture, self._forking_captured = reuses_old_logps, None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._forking_capture = False
        if ("old_per_token_logps" in output) != reuses_old_logps:
            raise RuntimeError(
                "forking_scope='batch': TRL computed old log-probs when forking_trl did not expect it (or the "
                "reverse); this TRL version is not supported. Use forking_scope='micro_batch'."
            )
        if reuses_old_logps:
            output["forking_entropies"] = self._forking_captured  # (B, T)
        self._forking_captured = None
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._dynamic_rewards_per_func = rewards_per_func  # (N_all_processes, num_funcs): dynamic sampling reads it
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, *args, compute_entropy=False, **kwargs):
        capture = self._forking_capture and self._forking_captured is None and model is self.model
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, *args, compute_entropy=compute_entropy or capture, **kwargs
        )
        if self._forking_inputs is not None:  # inside compute_loss: the policy's forward of the micro-batch
            self._forking_logps = logps  # (B, T), with its graph
        if capture:  # the first call of the generation batch is TRL's old-log-prob pass with the policy
            self._forking_captured = entropies.detach().float()
            entropies = entropies if compute_entropy else None
        return logps, entropies, aux_loss

    # ------------------------------------------------------------------------------------------------------------
    # dynamic sampling (DAPO): the decisions are forking_trl.dynamic_sampling's pure functions

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
        batch["num_items_in_batch"] = self.accelerator.gather(_loss_mask(batch).sum()).sum()  # recounted, as TRL
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
            seed = self.args.seed + 1 + self._dynamic_passes
            loader = self._get_dataloader(
                dataset=self.train_dataset,
                description="Dynamic sampling",
                batch_size=self._train_batch_size * self.args.steps_per_generation,
                sampler_fn=lambda dataset: RepeatSampler(
                    data_source=dataset,
                    mini_repeat_count=self.num_generations,
                    batch_size=self.args.generation_batch_size // self.num_generations,
                    repeat_count=1,
                    shuffle=True,
                    seed=seed,
                ),
                is_training=True,
            )
            self._dynamic_iterator = iter(loader)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints: the forking fields, the random mode's generator and the further-prompt stream travel with them

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # makes output_dir on every process
        if self.args.should_save:
            with open(os.path.join(output_dir, FORKING_STATE_NAME), "w") as f:
                json.dump(self.args.forking_fields(), f, indent=2)
            if self.args.dynamic_sampling:  # the same on every process
                with open(os.path.join(output_dir, DYNAMIC_SAMPLING_STATE_NAME), "w") as f:
                    json.dump({"passes": self._dynamic_passes, "drawn": self._dynamic_drawn}, f)
        torch.save(self._forking_generator.get_state(), self._generator_file(output_dir))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:  # as Trainer.train: the last checkpoint in output_dir (Trainer raises if none)
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            self._restore_forking_state(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def end_distributed(self, grace_s: float = 0.2) -> None:
        """End a launched run cleanly; call it last in a script (the trainer cannot train after it).

        Finishes Accelerate's trackers and destroys the process group (`accelerator.end_training()`, as PyTorch asks
        of every script), then, if a group existed, sleeps `grace_s` seconds with the GIL released. The sleep is for
        gloo (CPU runs): a gloo worker thread frees the tensors of the last collective (transformers' final
        `store_flos` all-gather, about 1 ms before the script ends) only after the caller has its result, and needs
        the GIL for that. If the interpreter is already finalizing, the thread is killed inside C++ and the rank
        aborts with "terminate called without an active exception" (pytorch/pytorch#190489); destroying the group
        does not stop its workers while something else still holds it (DeepSpeed keeps the world group as a default
        argument). Seen in ~1 of 30 two-process CPU runs under load without this; the sleep gives the worker its turn.
        """
        was_distributed = dist.is_available() and dist.is_initialized()
        self.accelerator.end_training()
        if was_distributed:
            time.sleep(grace_s)

    def _restore_forking_state(self, checkpoint: str) -> None:
        """Warn about each forking field that differs from the checkpoint's run; restore the generator and the
        further-prompt stream."""
        path = os.path.join(checkpoint, FORKING_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "forking_trl: %s has no %s (saved by another trainer or an older forking_trl); the forking fields "
                "of the run it comes from are unknown and were not checked.",
                checkpoint,
                FORKING_STATE_NAME,
            )
        else:
            with open(path) as f:
                saved = json.load(f)
            now = self.args.forking_fields()
            for name in sorted(set(saved) | set(now)):
                if saved.get(name, "<absent>") != now.get(name, "<absent>"):
                    logger.warning(
                        "forking_trl: resuming from %s with %s=%r, but the run that saved it used %s=%r: the "
                        "training after the checkpoint differs from the training before it.",
                        checkpoint,
                        name,
                        now.get(name, "<absent>"),
                        name,
                        saved.get(name, "<absent>"),
                    )
        generator_file = self._generator_file(checkpoint)
        if os.path.isfile(generator_file):
            self._forking_generator.set_state(torch.load(generator_file, weights_only=True))
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

    def _generator_file(self, directory: str) -> str:
        return os.path.join(directory, f"forking_generator_{self.accelerator.process_index}.pth")

    # ------------------------------------------------------------------------------------------------------------
    # helpers

    def _trl_computes_old_logps(self) -> bool:
        # mirrors the condition in GRPOTrainer._generate_and_score_completions; checked against its output above
        return not self.args.fully_on_policy() or bool(self.use_vllm and self.vllm_importance_sampling_correction)

    @torch.no_grad()
    def _generation_batch_entropies(self, output: dict) -> torch.Tensor:
        """One extra no-grad forward over the generation batch, for its entropies (text models only)."""
        if any(key in output for key in ("pixel_values", "image_grid_thw", "num_images")):
            raise ValueError(
                "forking_scope='batch' computes the generation batch's entropies with an extra text-only forward, "
                "which does not support image inputs. Use forking_scope='micro_batch'."
            )
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        extra = {k: output[k] for k in ("token_type_ids", "mm_token_type_ids") if k in output}
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            _, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                output["completion_ids"].size(1),
                batch_size=batch_size,
                compute_entropy=True,
                **extra,
            )
        return entropies.float()

    def _select_and_record(self, entropies, mask, completion_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Select, log the metrics, count the kept tokens; return the `(B, T)` mask and the valid/kept scale
        (a scalar over the scope, or `(B,)` for the sequence scope)."""
        selection = self._select(entropies, mask, per_sequence=self.args.forking_scope == "sequence")
        self._log_selection(selection, entropies, mask)
        self._count_kept_tokens(selection.mask, completion_ids)
        return selection.mask, (selection.num_valid.clamp(min=1) / selection.num_kept.clamp(min=1)).float()

    def _select(self, entropies: torch.Tensor, mask: torch.Tensor, per_sequence: bool) -> ForkingSelection:
        scope = self.args.forking_scope
        distributed = scope in ("micro_batch", "batch") and self.accelerator.num_processes > 1
        return forking_select(
            entropies,
            mask,
            mode=self.args.forking_mode,
            ratio=self.args.forking_ratio,
            selection=self.args.forking_selection,
            per_sequence=per_sequence,
            group=dist.group.WORLD if distributed else None,
            generator=self._forking_generator,
        )

    def _policy_weights(self, keep: torch.Tensor, mask: torch.Tensor, scope_scale: torch.Tensor) -> torch.Tensor:
        """`keep` as the multiplier of the per-token policy loss, `(B, T)`."""
        if self.args.forking_normalizer == "all":
            return keep
        if self.loss_type in SEQUENCE_MEAN_LOSSES:  # each sequence is averaged on its own: valid_i / kept_i
            scale = mask.sum(dim=1).clamp(min=1) / keep.sum(dim=1).clamp(min=1)  # (B,)
        else:  # one token mean over the scope: valid / kept there
            scale = scope_scale
        scale = scale.to(mask.device, torch.float32)
        return keep.float() * (scale.unsqueeze(-1) if scale.dim() == 1 else scale)

    def _log_selection(self, selection: ForkingSelection, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Append the forking metrics, reduced over all processes in one small all-reduce."""
        mode = "train" if self.model.training else "eval"
        entropies = entropies.detach().float()
        valid = mask.bool() & torch.isfinite(entropies)
        keep = selection.mask
        dropped = valid & ~keep
        tau = selection.threshold.reshape(-1)
        tau = tau[torch.isfinite(tau)]
        local = torch.stack(
            [
                keep.sum().float(),
                valid.sum().float(),
                torch.where(keep, entropies, 0.0).sum(),
                torch.where(dropped, entropies, 0.0).sum(),
                tau.sum() if tau.numel() else torch.zeros((), device=tau.device),
                torch.tensor(float(tau.numel()), device=tau.device),
                (valid & (entropies < LOW_ENTROPY)).sum().float(),
            ]
        ).to(self.accelerator.device)
        reduced = self.accelerator.reduce(local, reduction="sum").tolist()
        kept, valid_n, h_kept, h_dropped, tau_sum, tau_n, low = reduced
        metrics = self._metrics[mode]
        # the entropy pattern of all valid tokens of all processes, exact, constant communication (radix select)
        group = dist.group.WORLD if self.accelerator.num_processes > 1 else None
        for q, value in zip(ENTROPY_PERCENTILES, percentiles(entropies, valid, ENTROPY_PERCENTILES, group=group)):
            metrics[f"entropy/p{q}"].append(value)
        metrics[f"entropy/share_below_{LOW_ENTROPY}"].append(low / valid_n if valid_n else float("nan"))
        metrics["forking/kept_fraction"].append(kept / valid_n if valid_n else float("nan"))
        metrics["forking/entropy_kept"].append(h_kept / kept if kept else float("nan"))
        metrics["forking/entropy_dropped"].append(h_dropped / (valid_n - kept) if valid_n > kept else float("nan"))
        if self.args.forking_mode != "random" and tau_n:
            # global scopes: every process holds the same tau; rank/sequence scopes: the mean of the local ones
            metrics["forking/threshold"].append(tau_sum / tau_n)
        if selection.num_nonfinite:
            metrics["forking/nonfinite_tokens"].append(float(selection.num_nonfinite))
            if not self._forking_warned_nonfinite:
                logger.warning(
                    "forking_trl: %d valid completion tokens had a NaN or inf entropy (logged as "
                    "forking/nonfinite_tokens). They were left out of the selection, so the threshold and the kept "
                    "share are those of the finite tokens; but a NaN entropy comes from NaN logits, whose log-probs "
                    "are NaN as well, and a NaN times a zero weight is still NaN: this micro-batch's loss and "
                    "gradients are NaN whatever is selected. Check the learning rate, the dtype and the data.",
                    selection.num_nonfinite,
                )
                self._forking_warned_nonfinite = True

    def _log_covariance(self, x: CreditInputs, terms: MethodTerms | None) -> None:
        """`cov/*` (mean cov_t over the valid, kept and dropped tokens) and the method's own counts, summed over all
        processes in one small all-reduce; each method's shares are of the kept tokens (those it may act on)."""
        mode = "train" if self.model.training else "eval"
        cov, valid, kept = x.covariance, x.valid(), x.acting()
        dropped = valid & ~kept
        zero = torch.zeros((), device=cov.device)
        local = torch.stack(
            [
                valid.sum().float(),
                cov.sum(),  # cov is 0 off the valid tokens
                kept.sum().float(),
                torch.where(kept, cov, 0.0).sum(),
                dropped.sum().float(),
                torch.where(dropped, cov, 0.0).sum(),
                terms.counted.sum().float() if terms is not None else zero,
                terms.value.sum() if terms is not None and terms.value is not None else zero,
            ]
        ).to(self.accelerator.device)
        n_valid, cov_valid, n_kept, cov_kept, n_dropped, cov_dropped, counted, value = self.accelerator.reduce(
            local, reduction="sum"
        ).tolist()
        metrics = self._metrics[mode]
        if n_valid:
            metrics["cov/mean"].append(cov_valid / n_valid)
        if n_kept:
            metrics["cov/kept"].append(cov_kept / n_kept)
        if n_dropped:
            metrics["cov/dropped"].append(cov_dropped / n_dropped)
        method = self.args.entropy_method
        if terms is None or not n_kept:
            return
        if method == "clip_cov":
            metrics["clip_cov/clipped_fraction"].append(counted / n_kept)
        elif method == "kl_cov":
            metrics["kl_cov/penalized_fraction"].append(counted / n_kept)
            metrics["kl_cov/penalty"].append(value / counted if counted else 0.0)
        elif method == "entropy_adv":
            metrics["entropy_adv/shaping"].append(value / n_kept)
            metrics["entropy_adv/capped_fraction"].append(counted / n_kept)

    def _count_kept_tokens(self, keep: torch.Tensor, completion_ids: torch.Tensor | None) -> None:
        """Count kept token ids of this process for the window's most-frequent kept tokens (no extra forward)."""
        if not self.args.forking_log_top_tokens or completion_ids is None or not self.model.training:
            return
        ids, counts = torch.unique(completion_ids[keep.bool()], return_counts=True)
        self._kept_token_counts.update(dict(zip(ids.tolist(), counts.tolist())))

    def top_kept_tokens(self, n: int | None = None) -> list[tuple[str, int]]:
        """The most frequent kept tokens of the current logging window on this process, decoded, with counts."""
        n = self.args.forking_log_top_tokens if n is None else n
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return [(tokenizer.decode([token_id]), count) for token_id, count in self._kept_token_counts.most_common(n)]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._kept_token_counts:
            top = self.top_kept_tokens()
            self._kept_token_counts.clear()
            if self.accelerator.is_main_process and top:
                shown = ", ".join(f"{text!r}×{count}" for text, count in top)
                print(f"[forking] step {self.state.global_step}: most frequent kept tokens: {shown}")
                self._log_top_tokens_table(top)
        super().log(logs, start_time)

    def _log_top_tokens_table(self, top: list[tuple[str, int]]) -> None:
        if not self.args.report_to or "wandb" not in self.args.report_to:
            return
        import wandb  # only when the user asked for wandb

        if wandb.run is not None:
            table = wandb.Table(columns=["step", "token", "count"])
            for text, count in top:
                table.add_data(self.state.global_step, text, count)
            wandb.log({"forking/top_kept_tokens": table}, commit=False)


def _loss_mask(output: dict) -> torch.Tensor:
    """`(B, T)` tokens of a generation batch that count in the loss: the completion mask times TRL's tool mask."""
    mask = output["completion_mask"]
    return mask * output["tool_mask"] if "tool_mask" in output else mask
