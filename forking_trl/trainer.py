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

- `_save_rng_state(output_dir)` and `_restore_checkpoint_state(checkpoint)` (called by `train` on resume): the
  forking fields and the random mode's generator are saved beside TRL's RNG states in each checkpoint, and checked
  and restored on resume.

DAPO's dynamic sampling is `DynamicSamplingMixin` (`forking_trl.dynamic_sampling_trainer`), composed here: its
generation rounds call `_generate_round`, which the batch scope wraps, and its checkpoint state travels beside ours.

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

import torch
import torch.distributed as dist
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .branching_trainer import BranchingMixin
from .config import ON_POLICY_RULE, SEQUENCE_MEAN_LOSSES
from .credit import METHODS, CreditInputs, MethodTerms, token_covariance
from .dynamic_sampling_trainer import DynamicSamplingMixin, loss_mask
from .entropy import LOW_ENTROPY
from .forking_config import ForkingGRPOConfig
from .selection import ForkingSelection, forking_select, percentiles, scheduled_ratio

logger = logging.getLogger(__name__)

ENTROPY_PERCENTILES = (50, 80, 95)  # logged as entropy/p50, ... (nearest rank, all valid tokens of all processes)
FORKING_STATE_NAME = "forking_state.json"  # in each checkpoint: the forking fields of the run that saved it


# The order of the mixins, written down once: dynamic sampling's rounds outermost (each round is one branched
# generation, and a group is informative over all its leaves), then branching (its roots, forks and branches inside
# TRL's generation), then TRL. This class's own hooks wrap both (the batch scope selects over the stacked batch).
class ForkingGRPOTrainer(DynamicSamplingMixin, BranchingMixin, GRPOTrainer):
    """`trl.GRPOTrainer` whose policy gradient reaches only the selected (by default top-20% entropy) tokens.

    Same constructor as `GRPOTrainer`. `args` may be a `ForkingGRPOConfig`, or a plain `GRPOConfig`, which is
    promoted with the forking defaults (`forking_mode="top"`, `forking_ratio=0.2`); a plain config's
    `top_entropy_quantile < 1` becomes `forking_ratio`.

    Metrics (averaged by TRL's `log`): `forking/ratio` (ρ of the step, by `forking_ratio_schedule`; not with
    `forking_mode="all"`), `forking/threshold`, `forking/kept_fraction`, `forking/entropy_kept`,
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

    With `dynamic_sampling=True`, DAPO's dynamic sampling (`DynamicSamplingMixin`) and its `dynamic_sampling/*` metrics.
    With `branching=True`, branching rollouts at the forks (`BranchingMixin`) and its `branching/*` metrics; the
    selection then sees the tokens that are in the loss (a branch's copied prefix is not, unless
    `branching_train_prefix=True`).

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

    config_class = ForkingGRPOConfig  # the mixin promotes `args` to it and validates it before TRL's __init__

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)
        args = self.args

        # TRL applies `get_high_entropy_mask` only when this is below 1; our hook reads the forking_* fields instead.
        self.top_entropy_quantile = 0.0

        self._forking_inputs: dict | None = None  # the micro-batch `compute_loss` is working on
        self._forking_capture: bool = False  # batch scope: take entropies from TRL's old-log-prob pass
        self._forking_captured: torch.Tensor | None = None
        self._forking_warned_nonfinite = False
        self._forking_generator = torch.Generator(device=self.accelerator.device)
        self._forking_generator.manual_seed(args.seed + 1_000_003 * self.accelerator.process_index)
        self._kept_token_counts: collections.Counter[int] = collections.Counter()
        self._forking_logps: torch.Tensor | None = None  # (B, T) the policy's log-probs in compute_loss, with grad
        self._method_extra: torch.Tensor | None = None  # (B, T) KL-Cov's term, added to the loss by compute_loss
        if args.entropy_method == "kl_cov":
            # the reference trains KL-Cov on the unclipped surrogate -r A: open TRL's clip (read only by the loss and
            # the clip metrics; pinned in tests/test_trl_contract.py)
            self.epsilon_low, self.epsilon_high = 1.0, math.inf
            if args.fully_on_policy():
                logger.warning(
                    "forking_trl: entropy_method='kl_cov' on a fully on-policy run (%s): log π_old is log π itself, "
                    "so KL-Cov's penalty |log π − log π_old| is 0 in value and gradient and the run trains plain "
                    "GRPO on the unclipped surrogate. %s Its penalty acts on the micro-batches after an optimizer "
                    "step inside a generation batch: choose gradient_accumulation_steps that is not a multiple of "
                    "steps_per_generation × num_iterations (e.g. steps_per_generation above it).",
                    args.on_policy_reason(),
                    ON_POLICY_RULE,
                )

    # ------------------------------------------------------------------------------------------------------------
    # hooks

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._forking_inputs = inputs
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._method_extra is not None:  # KL-Cov: L_t + extra_t, aggregated as TRL aggregated L_t
                loss = loss + self._aggregate_like_trl(self._method_extra, loss_mask(inputs), inputs)
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
            if terms.extra is not None:  # KL-Cov: its penalty normalised like the policy term it regularises (the
                # penalised tokens are kept ones, so `weights` is 1 on them, or valid/kept with normalizer "kept")
                self._method_extra = terms.extra * weights
            if terms.weight is not None:
                weights = weights * terms.weight
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
        output = super()._generate_and_score_completions(inputs)  # dynamic sampling's rounds, or one round
        if self.args.forking_scope != "batch":
            return output

        # batch scope: select once over the generation batch actually trained on
        entropies = output.pop("forking_entropies", None)
        if entropies is None:
            entropies = self._generation_batch_entropies(output)
        # (B, T) bool and a 0-dim scale: TRL's shuffle and split carry both to every micro-batch
        output["forking_mask"], output["forking_scale"] = self._select_and_record(
            entropies, loss_mask(output), output["completion_ids"]
        )
        return output

    def _generate_round(self, inputs):
        """One TRL generation round; with `forking_scope="batch"`, its entropies ride along as `forking_entropies`
        when TRL's old-log-prob pass gave them."""
        if self.args.forking_scope != "batch":
            return super()._generate_round(inputs)
        reuses_old_logps = self._trl_computes_old_logps()
        self._forking_capture, self._forking_captured = reuses_old_logps, None
        try:
            output = super()._generate_round(inputs)
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
    # checkpoints: the forking fields and the random mode's generator travel with them (the stream: the mixin)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # TRL's and dynamic sampling's; makes output_dir on every process
        if self.args.should_save:
            with open(os.path.join(output_dir, FORKING_STATE_NAME), "w") as f:
                json.dump(self.args.forking_fields(), f, indent=2)
        torch.save(self._forking_generator.get_state(), self._generator_file(output_dir))

    def _restore_checkpoint_state(self, checkpoint: str) -> None:
        self._restore_forking_state(checkpoint)
        super()._restore_checkpoint_state(checkpoint)  # dynamic sampling's further-prompt stream

    def _restore_forking_state(self, checkpoint: str) -> None:
        """Warn about each forking field that differs from the checkpoint's run; restore the generator."""
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
            ratio=self.forking_ratio_now(),
            selection=self.args.forking_selection,
            per_sequence=per_sequence,
            group=dist.group.WORLD if distributed else None,
            generator=self._forking_generator,
        )

    def forking_ratio_now(self) -> float:
        """ρ for the optimizer step in progress, by `forking_ratio_schedule` (a function of the step, so a resumed
        run continues it exactly)."""
        a = self.args
        return scheduled_ratio(
            a.forking_ratio_schedule,
            a.forking_ratio,
            a.forking_ratio_end,
            self.state.global_step,
            self.state.max_steps,
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
        if self.args.forking_mode != "all":
            metrics["forking/ratio"].append(self.forking_ratio_now())
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
