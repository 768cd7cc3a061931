"""Branching rollouts on TRL's `GRPOTrainer`: `BranchingMixin` and `BranchingGRPOTrainer`.

The decisions (which positions are forks, the tree's credit) are the pure functions of `forking_trl.branching`; this
module feeds them from TRL's generation and hands back ordinary completions. A group of `G` rows keeps TRL's layout:
its first `M` rows are roots, the other `G - M` branches (prefix copied from a root, continuation sampled).

TRL hooks (`trl>=1.16,<1.17`; pinned in `tests/test_trl_contract.py`):

- `_generate_single_turn(prompt_ids, ...)`: every generation backend passes through it (transformers `generate`,
  continuous batching, vLLM colocate and server). While training with `branching=True`: one call for the roots, one
  no-grad forward over them for the fork scores, one call for the branches (prompt + prefix as token ids, never
  decoded and re-tokenized; the continuation limited to `max_completion_length - t`). Every process makes the same
  calls, and one small gather agrees on the branches' length limit.
- `_generate(prompts)`: with `branching_train_prefix=False`, returns TRL's per-token loss mask (`tool_mask`), 0 on
  each branch's copied prefix: TRL masks the loss, counts `num_items_in_batch` and pads with it.
- `_calculate_rewards`: remembers the rewards of every process, as TRL gathers them.
- `_generate_and_score_completions`: with `branching_advantage="tree"`, replaces TRL's `(B,)` advantages by the
  `(B, T)` tree advantages (TRL's `_compute_loss` takes them); logs the `branching/*` metrics.
"""

from __future__ import annotations

import contextlib
import logging
import textwrap
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .branching import GroupTree, allowed_positions, answer_start, select_forks, tree_advantages
from .branching_config import BranchingGRPOConfig
from .dynamic_sampling import training_rewards
from .extension import TrainerExtension, router_logits_off

logger = logging.getLogger(__name__)


@dataclass
class BranchPlan:
    """What one branched generation round made, for the loss mask, the credit and the metrics (local rows)."""

    trees: list[GroupTree]  # one per local group
    prefix: list[int]  # per local row: leading tokens copied from its root (0 for roots and fresh samples)
    fork_scores: list[float] = field(default_factory=list)  # the score at each fork taken (fresh samples: none)
    token_score_sum: float = 0.0  # over every valid token of the roots
    token_score_count: int = 0
    fresh: int = 0  # branches sampled from position 0 (too few allowed positions)
    generated: int = 0  # tokens sampled: the roots' and the branches' continuations
    completions: list | None = None  # decoded, as TRL decoded them (for distinct answers)


class BranchingMixin(TrainerExtension):
    """Branching rollouts for a `GRPOTrainer` subclass: `class MyTrainer(BranchingMixin, GRPOTrainer)`.

    `args` is promoted to `config_class` (`BranchingGRPOConfig`, or a subclass's own config) and validated before
    TRL's `__init__`; tools, `environment_factory`, `rollout_func` and vision-language models are refused with
    `branching=True`. Metrics, while training with it on: `branching/forks_per_root`, `branching/fork_score` and
    `branching/token_score` (mean score at the forks, and over every token of the roots), `branching/fresh_samples`
    (share of branches sampled from position 0 because too few positions were allowed),
    `branching/generated_tokens_ratio` (tokens sampled for the groups over the tokens of as many independent
    completions of the same lengths), `branching/root_reward`, `branching/branch_reward`,
    `branching/changed_outcome` (share of branches whose reward differs from their root's) and
    `branching/distinct_answers` (distinct final answers per group, `forking_trl.rewards.extract_answer`).
    """

    config_class = BranchingGRPOConfig

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)  # TrainerExtension promotes `args`
        self._branching_plan: BranchPlan | None = None
        self._generated_tokens = (
            0  # completion tokens sampled while training, this process (see generated_tokens_total)
        )
        self._branching_rewards_per_func: torch.Tensor | None = None  # (N_all, F), as TRL gathered them
        if self.args.branching:
            self._refuse_unsupported_branching(vars(self))

    def _check_before_trl(self, args, kwargs: dict) -> None:
        super()._check_before_trl(args, kwargs)
        if args.branching:
            self._refuse_unsupported_branching(kwargs)

    def _refuse_unsupported_branching(self, given: dict) -> None:
        """Before TRL's `__init__` from its keyword arguments, after it from the trainer's attributes."""
        unsupported = []
        if given.get("tools") or given.get("environment_factory") or given.get("environment_factories"):
            unsupported.append("tools / environment_factory (a tool call's response would be copied into branches)")
        if given.get("rollout_func") is not None:
            unsupported.append("rollout_func (it replaces the generation branching grows)")
        if given.get("_is_vlm"):
            unsupported.append("a vision-language model (multimodal prompts)")
        if unsupported:
            raise ValueError(
                f"branching=True does not support {'; '.join(unsupported)}. Set branching=False for this trainer."
            )

    # ------------------------------------------------------------------------------------------------------------
    # hooks

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not (self.args.branching and self.model.training):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        return self._branched_generation(prompt_ids, images, multimodal_fields, num_generations)

    def _generate(self, prompts):
        output = super()._generate(prompts)
        plan = self._branching_plan
        if self.model.training:  # a branch's copied prefix was not sampled
            self._generated_tokens += sum(map(len, output[1])) - (sum(plan.prefix) if plan is not None else 0)
        if plan is None:
            return output
        prompt_ids, completion_ids, tool_mask, completions, *rest = output
        plan.completions = completions
        if self.args.branching_train_prefix:
            return output
        # TRL's per-token loss mask: 0 on each branch's copied prefix, so each shared token is trained once
        tool_mask = [[0] * n + [1] * (len(ids) - n) for n, ids in zip(plan.prefix, completion_ids, strict=True)]
        return (prompt_ids, completion_ids, tool_mask, completions, *rest)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._branching_rewards_per_func = rewards_per_func  # (N_all_processes, num_funcs)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        plan, self._branching_plan = self._branching_plan, None
        if plan is None:
            return output
        G, B = self.num_generations, len(plan.prefix)
        rewards = training_rewards(
            self._branching_rewards_per_func, self.reward_weights, G, self.args.multi_objective_aggregation
        )
        start = self.accelerator.process_index * B
        local = rewards[start : start + B].float().cpu()  # (B,), this process's rows
        if self.args.branching_advantage == "tree":
            width = output["completion_ids"].size(1)
            advantages = [
                tree_advantages(local[g * G : (g + 1) * G], tree, width, self.args.branching_tree_weighting)
                for g, tree in enumerate(plan.trees)
            ]
            advantages = torch.cat(advantages)  # (B, T); unscored completions (reward NaN) get 0, as TRL's
            if not torch.isfinite(advantages).all():  # an infinite reward: refuse rather than train the weights to NaN
                bad = local[~torch.isfinite(local) & ~torch.isnan(local)].tolist()
                raise ValueError(
                    f"branching_advantage='tree': a reward function returned a non-finite reward ({bad[:4]}); "
                    "rewards must be finite numbers, or None for a completion that cannot be scored."
                )
            output["advantages"] = advantages.to(output["completion_ids"].device)
        self._log_branching(plan, local)
        return output

    # ------------------------------------------------------------------------------------------------------------
    # the branched round: roots, scores, forks, branches

    def _branched_generation(self, prompt_ids, images, multimodal_fields, G):
        args = self.args
        M, per_fork = args.num_roots, args.branching_per_fork
        if len(prompt_ids) % G:
            raise RuntimeError(f"branching: {len(prompt_ids)} prompts are not whole groups of {G}.")
        groups = len(prompt_ids) // G
        group_prompts = [prompt_ids[g * G] for g in range(groups)]
        # roots: M per prompt, in TRL's layout (each prompt M times in a row)
        root_prompts = [p for p in group_prompts for _ in range(M)]
        roots, root_logps = super()._generate_single_turn(root_prompts, images, multimodal_fields, M)
        scores = self._root_scores(root_prompts, roots)  # (groups * M, T) float, NaN past each root's end
        lengths = [len(r) for r in roots]
        starts = [answer_start(self._token_texts(r), args.branching_answer_marker) for r in roots]
        allowed = allowed_positions(lengths, starts, scores.size(1))

        plan = BranchPlan(trees=[], prefix=[0] * len(prompt_ids))
        valid = ~torch.isnan(scores)
        plan.token_score_sum, plan.token_score_count = float(scores[valid].sum()), int(valid.sum())
        specs = []  # (group, root within the group, fork position), in row order
        for g in range(groups):
            rows = slice(g * M, (g + 1) * M)
            forks = select_forks(scores[rows], allowed[rows], (G - M) // per_fork, args.branching_min_distance)
            for fork in forks:
                if fork.position == 0:
                    plan.fresh += per_fork
                else:
                    plan.fork_scores.append(float(scores[g * M + fork.root, fork.position]))
                specs += [(g, fork.root, fork.position)] * per_fork

        # branches: prompt + the root's tokens before the fork, as token ids; continuations limited to L - t
        L = self.max_completion_length
        branch_prompts = [group_prompts[g] + roots[g * M + j][:t] for g, j, t in specs]
        local_min = min((t for _, _, t in specs), default=0)
        shortest = int(self.accelerator.gather(torch.tensor([local_min], device=self.accelerator.device)).min())
        with self._generation_length(L - shortest):
            continuations, branch_logps = super()._generate_single_turn(branch_prompts, images, multimodal_fields, 1)

        completion_ids, logprobs = [], [] if root_logps is not None else None
        branch = 0
        for g in range(groups):
            parent, fork, lens = list(range(M)), [0] * M, []
            for j in range(M):
                completion_ids.append(roots[g * M + j])
                lens.append(lengths[g * M + j])
                if logprobs is not None:
                    logprobs.append(root_logps[g * M + j])
            for _ in range(G - M):
                _, j, t = specs[branch]
                continuation = continuations[branch][: L - t]
                completion_ids.append(roots[g * M + j][:t] + list(continuation))
                if logprobs is not None:
                    logprobs.append(root_logps[g * M + j][:t] + list(branch_logps[branch][: L - t]))
                parent.append(j)
                fork.append(t)
                lens.append(t + len(continuation))
                plan.prefix[g * G + len(lens) - 1] = t
                plan.generated += len(continuation)
                branch += 1
            plan.trees.append(GroupTree(num_roots=M, parent=tuple(parent), fork=tuple(fork), lengths=tuple(lens)))
        plan.generated += sum(lengths)
        self._branching_plan = plan
        return completion_ids, logprobs

    @torch.no_grad()
    def _root_scores(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        """`(R, T)` float32 fork scores of the roots by `branching_score`, NaN past each root's end: one no-grad
        forward of the policy at the sampling temperature (TRL's own log-prob and entropy pass, called as TRL's so
        that a subclass's capture of that pass does not see it)."""
        device, pad = self.accelerator.device, self._tokenizer.pad_token_id
        width = max(1, max(map(len, completions)))
        prompt_width = max(map(len, prompts))
        ids = torch.full((len(prompts), prompt_width + width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):  # prompts left-padded, completions right
            ids[i, prompt_width - len(p) : prompt_width] = torch.tensor(p, dtype=torch.long)
            ids[i, prompt_width : prompt_width + len(c)] = torch.tensor(c, dtype=torch.long)
            attention[i, prompt_width - len(p) : prompt_width + len(c)] = 1
        entropy = self.args.branching_score == "entropy"
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            router_logits_off(self.model),  # a scoring pass: no load-balancing loss wanted
        ):
            logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self,
                self.model,
                ids.to(device),
                attention.to(device),
                width,
                batch_size=self.args.per_device_train_batch_size,
                compute_entropy=entropy,
            )
        scores = (entropies if entropy else -logps).float().cpu()  # (R, T)
        lengths = torch.tensor([len(c) for c in completions]).unsqueeze(1)
        return torch.where(torch.arange(width) < lengths, scores, torch.nan)

    def _token_texts(self, ids: list[int]) -> list[str]:
        if not self.args.branching_answer_marker:
            return []
        return self._tokenizer.batch_decode([[i] for i in ids])

    @contextlib.contextmanager
    def _generation_length(self, limit: int):
        """Generate at most `limit` new tokens inside the block, on whichever backend TRL uses."""
        if self.use_vllm:
            targets = [(self.vllm_generation, "max_completion_length")]
        else:
            targets = [(self.generation_config, "max_new_tokens")]
        saved = [getattr(obj, name) for obj, name in targets]
        kwargs = getattr(self, "generation_kwargs", None)
        saved_kwarg = kwargs.get("max_new_tokens") if isinstance(kwargs, dict) else None
        try:
            for obj, name in targets:
                setattr(obj, name, max(1, limit))
            if saved_kwarg is not None:
                kwargs["max_new_tokens"] = max(1, limit)
            yield
        finally:
            for (obj, name), value in zip(targets, saved, strict=True):
                setattr(obj, name, value)
            if saved_kwarg is not None:
                kwargs["max_new_tokens"] = saved_kwarg

    # ------------------------------------------------------------------------------------------------------------
    # metrics

    def generated_tokens_total(self) -> int:
        """Completion tokens sampled while training so far, over all processes (a branch counts its continuation, not
        its copied prefix; every generation round of dynamic sampling counts): what a run spent on generation, to
        compare methods per generated token. Call it on every process (one all-reduce)."""
        local = torch.tensor([self._generated_tokens], dtype=torch.float64, device=self.accelerator.device)
        return int(self.accelerator.reduce(local, reduction="sum").item())

    def _log_branching(self, plan: BranchPlan, rewards: torch.Tensor) -> None:
        """The `branching/*` metrics, summed over all processes in one small all-reduce."""
        from .rewards import completion_text, extract_answer

        G, M = self.num_generations, self.args.num_roots
        root_reward = branch_reward = changed = distinct = 0.0
        total_tokens = 0
        for g, tree in enumerate(plan.trees):
            r = rewards[g * G : (g + 1) * G]
            root_reward += float(r[:M].nansum())
            for i in range(M, G):
                branch_reward += float(r[i].nan_to_num())
                changed += float(r[i] != r[tree.parent[i]])
            total_tokens += sum(tree.lengths)
            if plan.completions is not None:
                texts = plan.completions[g * G : (g + 1) * G]
                distinct += len({extract_answer(completion_text(text)) for text in texts})
        n_groups = len(plan.trees)
        local = torch.tensor(
            [
                n_groups * M,
                len(plan.fork_scores),
                plan.fresh,
                sum(plan.fork_scores),
                plan.token_score_sum,
                plan.token_score_count,
                plan.generated,
                total_tokens,
                root_reward,
                branch_reward,
                changed,
                distinct,
                n_groups,
            ],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        (
            roots,
            forks,
            fresh,
            fork_sum,
            token_sum,
            token_n,
            generated,
            total,
            root_r,
            branch_r,
            changed,
            distinct,
            n,
        ) = self.accelerator.reduce(local, reduction="sum").tolist()
        branches = n * (G - M)
        metrics = self._metrics["train"]
        metrics["branching/forks_per_root"].append(forks / roots if roots else 0.0)
        metrics["branching/fresh_samples"].append(fresh / branches if branches else 0.0)
        if forks:
            metrics["branching/fork_score"].append(fork_sum / forks)
        if token_n:
            metrics["branching/token_score"].append(token_sum / token_n)
        metrics["branching/generated_tokens_ratio"].append(generated / total if total else 1.0)
        metrics["branching/root_reward"].append(root_r / roots if roots else float("nan"))
        metrics["branching/branch_reward"].append(branch_r / branches if branches else float("nan"))
        metrics["branching/changed_outcome"].append(changed / branches if branches else 0.0)
        metrics["branching/distinct_answers"].append(distinct / n if n else float("nan"))


class BranchingGRPOTrainer(BranchingMixin, GRPOTrainer):
    """`trl.GRPOTrainer` with branching rollouts at the forks, and nothing else.

    Same constructor as `GRPOTrainer`. `args` may be a `BranchingGRPOConfig`, or a plain `GRPOConfig`, which is
    promoted with branching on (`branching=True`, M = G // 2 roots, one continuation per fork, entropy scores, TRL's
    group advantage). With `branching=False` it trains exactly as `GRPOTrainer`. Metrics: see `BranchingMixin`.
    """

    _tag_names = ["trl", "grpo", "tree-rollouts", "branching", "forking-trl"]
    _name = "GRPO with branching rollouts"
    _paper = {
        "title": "TreeRL: LLM Reinforcement Learning with On-Policy Tree Search",
        "id": "2506.11902",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{hou2025treerl,
                title        = {{TreeRL: LLM Reinforcement Learning with On-Policy Tree Search}},
                author       = {Zhenyu Hou and others},
                year         = 2025,
                eprint       = {arXiv:2506.11902},
            }"""),
    }
