"""Branching rollouts: the pure decisions on hand-built tensors (forks, trees), then the trainers (tests below)."""

import json
import math

import pytest
import torch

from forking_trl.branching import (
    TREE_WEIGHTINGS,
    Fork,
    GroupTree,
    allowed_positions,
    answer_start,
    leave_one_out,
    select_forks,
    tree_advantages,
)

# ---------------------------------------------------------------------------------------------------------------
# where a root may fork, and which forks a group takes


def test_allowed_positions_exclude_padding_the_last_token_and_the_answer():
    allowed = allowed_positions([5, 3, 6, 1], [None, None, 2, None], width=6)
    assert allowed.tolist() == [
        [False, True, True, True, False, False],  # length 5: 1..3 (0 shares nothing, 4 is the last), 5 is padding
        [False, True, False, False, False, False],
        [False, True, True, False, False, False],  # answer begins at token 2: fork at 2 allowed, not inside
        [False] * 6,  # a one-token root has no position to fork at
    ]


def test_answer_start_finds_the_token_where_the_marker_begins():
    pieces = ["So", " x", "=", "3", ". \\bo", "xed{", "3", "}"]
    assert answer_start(pieces, "\\boxed{") == 4  # the marker begins inside token 4
    assert answer_start(pieces, "nothing") is None and answer_start(pieces, None) is None
    assert answer_start(["\\boxed{1}"], "\\boxed{") == 0


def test_select_forks_takes_the_best_scored_allowed_positions_over_all_roots():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.2, 0.95, 0.3, float("nan")]])
    allowed = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # 0.95 (root 1, t 1), then 0.9 (root 0, t 1; t 3 of root 0 is not allowed), then 0.5; NaN never
    assert select_forks(scores, allowed, 3) == [Fork(1, 1), Fork(0, 1), Fork(0, 2)]


def test_select_forks_ties_go_to_the_earlier_position_then_the_lower_root():
    scores = torch.tensor([[0.5, 0.7, 0.7], [0.7, 0.7, 0.1]])
    allowed = torch.ones(2, 3, dtype=torch.bool)
    assert select_forks(scores, allowed, 4) == [Fork(1, 0), Fork(0, 1), Fork(1, 1), Fork(0, 2)]


def test_select_forks_keeps_a_minimum_distance_within_a_root_only():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.85, 0.1, 0.1, 0.1, 0.1]])
    allowed = torch.ones(2, 5, dtype=torch.bool)
    forks = select_forks(scores, allowed, 3, min_distance=3)
    assert forks == [Fork(0, 0), Fork(1, 0), Fork(0, 3)]  # 0.8 and 0.7 are within 3 of root 0's fork at 0


def test_select_forks_falls_back_to_fresh_samples_when_too_few_positions_are_allowed():
    scores = torch.tensor([[0.3, 0.2], [0.1, 0.4]])
    allowed = torch.tensor([[False, True], [False, False]])
    assert select_forks(scores, allowed, 4) == [Fork(0, 1), Fork(0, 0), Fork(1, 0), Fork(0, 0)]


def test_select_forks_refuses_bad_shapes():
    with pytest.raises(ValueError, match="both be"):
        select_forks(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="min_distance"):
        select_forks(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), 1, min_distance=0)


# ---------------------------------------------------------------------------------------------------------------
# tree advantages: against a hand-computed tree and an independent re-implementation of TreeRL's node algorithm

# group of 4: root 0 (6 tokens) with branches at 2 (row 2, 5 tokens) and 4 (row 3, 7 tokens); root 1 (5 tokens)
TREE = GroupTree(num_roots=2, parent=(0, 1, 0, 0), fork=(0, 0, 2, 4), lengths=(6, 5, 5, 7))


def test_leave_one_out_centring():
    c = leave_one_out(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert c.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.tensor([1.0]))


def test_tree_advantages_on_a_hand_computed_tree():
    a = tree_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), TREE, width=8, weighting="none")
    # c = (2/3, -2/3, -2/3, 2/3); V(top) = 0
    # root 0: [0,2) below {0,2,3}: V = 2/9, a = 4/9; [2,4) below {0,3}: V = 2/3, a = (2/3 - 2/9) + 2/3 = 10/9;
    #         [4,6) below {0}: V = 2/3, a = 2/3
    # branch 2 (forked at 2, parent [0,2)): (-2/3 - 2/9) - 2/3 = -14/9; branch 3 (at 4, parent [2,4)): 2/3
    # root 1: one segment, V = -2/3, a = -4/3
    expected = torch.zeros(4, 8, dtype=torch.float64)
    expected[0, :2], expected[0, 2:4], expected[0, 4:6] = 4 / 9, 10 / 9, 2 / 3
    expected[1, :5] = -4 / 3
    expected[2, :2], expected[2, 2:5] = 4 / 9, -14 / 9  # its copied prefix carries its root's value
    expected[3, :2], expected[3, 2:4], expected[3, 4:7] = 4 / 9, 10 / 9, 2 / 3
    torch.testing.assert_close(a, expected.float())


class Node:
    """TreeRL's MCTSNode, as its tree_node.py builds it: a segment, its children, the leaves' sums below it."""

    def __init__(self, parent=None, tokens=0):
        self.parent, self.children, self.tokens = parent, [], tokens
        self.accumulated, self.terminals = 0.0, 0
        if parent is not None:
            parent.children.append(self)


def treerl_reference(rewards, tree, width, weighting):
    """Build the tree of nodes, back-propagate the centred leaf values (`leaf_normalize`, `leaf_backpropagate`),
    reweight (`compute_weighted_update`), then each path's segment values (`path_from_root_to_node` with
    `use_state_value_reward`: value = (V - V_parent) + V), written onto each leaf's tokens."""
    G = len(rewards)
    top = Node()
    leaf_nodes, segments_of = {}, {}
    for root in range(tree.num_roots):
        cuts = sorted({tree.fork[b] for b in tree.branches_of(root)})
        bounds = [0, *cuts, tree.lengths[root]]
        parent, chain = top, []
        for start, end in zip(bounds, bounds[1:]):
            node = Node(parent, end - start)
            chain.append((start, end, node))
            parent = node
        segments_of[root] = chain
        leaf_nodes[root] = chain[-1][2]
    for b in range(tree.num_roots, G):
        if tree.fork[b] == 0:
            leaf_nodes[b] = Node(top, tree.lengths[b])
            continue
        parent = next(node for start, end, node in segments_of[tree.parent[b]] if end == tree.fork[b])
        leaf_nodes[b] = Node(parent, tree.lengths[b] - tree.fork[b])
    total = sum(rewards)
    for i, leaf in leaf_nodes.items():
        value = rewards[i] - (total - rewards[i]) / (G - 1)
        node = leaf
        while node is not None:
            node.accumulated += value
            node.terminals += 1
            node = node.parent

    def reweight(node):
        if weighting == "sqrt":
            node.accumulated /= math.sqrt(node.terminals)
        for child in node.children:
            reweight(child)

    reweight(top)

    def V(node):
        return node.accumulated / node.terminals

    out = torch.zeros(G, width, dtype=torch.float64)
    for i, leaf in leaf_nodes.items():
        path, node = [], leaf
        while node.parent is not None:
            path.append(node)
            node = node.parent
        position = 0
        for node in reversed(path):  # root to leaf: each segment's tokens in turn
            out[i, position : position + node.tokens] = (V(node) - V(node.parent)) + V(node)
            position += node.tokens
    return out.float()


RANDOM_TREES = [
    TREE,
    GroupTree(num_roots=1, parent=(0, 0, 0, 0), fork=(0, 3, 3, 1), lengths=(5, 6, 4, 2)),  # two branches at one fork
    GroupTree(num_roots=3, parent=(0, 1, 2, 1, 0), fork=(0, 0, 0, 2, 0), lengths=(4, 4, 3, 5, 6)),  # a fresh sample
    GroupTree(num_roots=2, parent=(0, 1, 0, 1, 0, 1), fork=(0, 0, 1, 1, 3, 2), lengths=(5, 4, 2, 9, 8, 3)),
]


@pytest.mark.parametrize("weighting", ["none", "sqrt"])
@pytest.mark.parametrize("index", range(len(RANDOM_TREES)))
def test_tree_advantages_equal_treerls_node_algorithm(index, weighting):
    tree = RANDOM_TREES[index]
    g = torch.Generator().manual_seed(index)
    for _ in range(3):
        rewards = torch.randint(0, 3, (len(tree.parent),), generator=g).float()
        ours = tree_advantages(rewards, tree, width=10, weighting=weighting)
        torch.testing.assert_close(ours, treerl_reference(rewards.tolist(), tree, 10, weighting))


def test_equal_rewards_give_zero_tree_advantages():
    assert torch.all(tree_advantages(torch.ones(4), TREE, width=8) == 0)


def test_an_unscored_leaf_gets_no_credit_and_poisons_nothing():
    # the bug: NaN summed into every row's leave-one-out baseline, so all four rows were NaN
    nan = float("nan")
    a = tree_advantages(torch.tensor([1.0, 0.0, 1.0, nan]), TREE, width=8, weighting="none")
    # scored leaves 0, 1, 2: c = (1 - 1/2, 0 - 1, 1 - 1/2) = (0.5, -1, 0.5); leaf 3 out of every value
    # root 0: [0,2) over {0,2}: V 0.5, a 1.0; [2,4) over {0}: a (0.5 - 0.5) + 0.5; [4,6) over {0}: a 0.5
    # branch 2 (at 2): (0.5 - 0.5) + 0.5; root 1: V -1, a -2; row 3 unscored: 0 throughout
    expected = torch.zeros(4, 8)
    expected[0, :2], expected[0, 2:6] = 1.0, 0.5
    expected[1, :5] = -2.0
    expected[2, :2], expected[2, 2:5] = 1.0, 0.5
    torch.testing.assert_close(a, expected)
    # as TRL's group advantage: the unscored row 0, a node with no scored leaf 0, a lone scored leaf 0
    assert torch.all(tree_advantages(torch.full((4,), nan), TREE, width=8) == 0)
    assert torch.all(tree_advantages(torch.tensor([nan, 1.0, nan, nan]), TREE, width=8) == 0)
    for weighting in TREE_WEIGHTINGS:
        r = torch.tensor([nan, 1.0, 0.0, nan, 2.0, 1.0])
        assert torch.isfinite(tree_advantages(r, RANDOM_TREES[3], width=10, weighting=weighting)).all()
    torch.testing.assert_close(
        leave_one_out(torch.tensor([1.0, nan, 0.0])), torch.tensor([1.0, nan, -1.0]).double(), equal_nan=True
    )


def test_group_tree_refuses_a_malformed_shape():
    with pytest.raises(ValueError, match="row 1 is a root"):
        GroupTree(num_roots=2, parent=(0, 0, 0), fork=(0, 0, 1), lengths=(3, 3, 3))
    with pytest.raises(ValueError, match="branch 2 must fork from a root, inside it"):
        GroupTree(num_roots=2, parent=(0, 1, 0), fork=(0, 0, 3), lengths=(3, 3, 4))


# ---------------------------------------------------------------------------------------------------------------
# the trainers: a branched round, its loss mask and credit, every generation path, composition

from _util import (  # noqa: E402
    AdvantageSpy,
    changed,
    half_constant_reward,
    length_reward,
    logged,
    prompt_dataset,
    snapshot,
    tiny_moe_model,
    trainer_args,
    uneven_prompt_dataset,
)
from test_launch import launch  # noqa: E402

from forking_trl import (  # noqa: E402
    BranchingGRPOConfig,
    BranchingGRPOTrainer,
    ForkingGRPOConfig,
    ForkingGRPOTrainer,
)
from forking_trl.branching import answer_start as find_answer  # noqa: E402

G, M = 4, 2


def branching_trainer(tiny_model, tmp_path, trainer_class=BranchingGRPOTrainer, reward=length_reward, **overrides):
    config = BranchingGRPOConfig if trainer_class is BranchingGRPOTrainer else ForkingGRPOConfig
    settings = {"branching": True, "branching_roots": M, "num_generations": G, **overrides}
    if not settings["branching"]:
        settings.pop("branching_roots")  # unused, so refused
    args = trainer_args(tmp_path, config_class=config, **settings)
    return trainer_class(tiny_model, reward, args=args, train_dataset=prompt_dataset())


def one_round(trainer, groups=2):
    """One generation round while training, on `groups` prompts in TRL's layout; (output, plan)."""
    rows = [row for row in list(prompt_dataset())[:groups] for _ in range(trainer.num_generations)]
    plans, branched = [], trainer._branched_generation

    def record(*args):
        out = branched(*args)
        plans.append(trainer._branching_plan)
        return out

    trainer._branched_generation = record
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows)
    (plan,) = plans
    return output, plan


def test_a_branched_round_copies_each_prefix_and_masks_it_out_of_the_loss(tiny_model, tmp_path):
    trainer = branching_trainer(tiny_model, tmp_path, max_completion_length=16)
    limits, length = [], trainer._generation_length
    trainer._generation_length = lambda n: limits.append(n) or length(n)
    output, plan = one_round(trainer)
    ids, mask, tool = output["completion_ids"], output["completion_mask"], output["tool_mask"]
    lengths = mask.sum(1).tolist()
    L = trainer.max_completion_length
    for g, tree in enumerate(plan.trees):
        assert tree.parent[:M] == tuple(range(M)) and tree.lengths == tuple(lengths[g * G : (g + 1) * G])
        for i in range(M, G):
            row, root, t = g * G + i, g * G + tree.parent[i], tree.fork[i]
            assert 1 <= t < lengths[root] - 1 and plan.prefix[row] == t
            assert torch.equal(ids[row, :t], ids[root, :t])  # token for token before the fork
            assert tool[row, :t].sum() == 0 and torch.all(tool[row, t : lengths[row]] == 1)
            assert lengths[row] <= L
        assert torch.all(tool[g * G : g * G + M] == 1)  # roots: every token in the loss
    assert output["num_items_in_batch"] == (mask * tool).sum()  # TRL counted the loss tokens with the mask
    assert limits == [L - min(plan.prefix[r] for r in range(len(plan.prefix)) if r % G >= M)]
    metrics = trainer._metrics["train"]
    assert metrics["branching/forks_per_root"] == [(G - M) / M] and metrics["branching/fresh_samples"] == [0.0]
    total = sum(lengths)
    copied = sum(plan.prefix)
    assert metrics["branching/generated_tokens_ratio"] == [pytest.approx((total - copied) / total)]
    assert trainer.generated_tokens_total() == total - copied  # what the runner compares arms by, per token


def test_generated_tokens_count_every_sampled_completion_token_while_training_only(tiny_model, tmp_path):
    trainer = branching_trainer(tiny_model, tmp_path, branching=False, max_completion_length=16)
    rows = [row for row in list(prompt_dataset())[:2] for _ in range(G)]
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows)
    trainer.model.eval()  # evaluation rounds do not count
    trainer._generate_and_score_completions(rows)
    assert trainer.generated_tokens_total() == int(output["completion_mask"].sum()) > 0


def test_the_forks_are_the_best_scored_allowed_positions(tiny_model, tmp_path):
    trainer = branching_trainer(tiny_model, tmp_path, max_completion_length=16, branching_score="surprisal")
    output, plan = one_round(trainer)
    ids, lengths = output["completion_ids"], output["completion_mask"].sum(1).tolist()
    prompts = [p[m.bool()].tolist() for p, m in zip(output["prompt_ids"], output["prompt_mask"])]
    for g, tree in enumerate(plan.trees):
        roots = [g * G + j for j in range(M)]
        scores = trainer._root_scores([prompts[r] for r in roots], [ids[r, : lengths[r]].tolist() for r in roots])
        allowed = allowed_positions([lengths[r] for r in roots], [None] * M, scores.size(1))
        forks = select_forks(scores, allowed, G - M)
        assert [(tree.parent[i], tree.fork[i]) for i in range(M, G)] == [(f.root, f.position) for f in forks]
        best = torch.where(allowed, scores, -torch.inf).max()
        assert scores[forks[0].root, forks[0].position] == best  # the first fork is the best allowed position
        # surprisal: -log p of the sampled token at the sampling temperature, from TRL's own pass
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([output["prompt_ids"], ids], 1)[roots],
            torch.cat([output["prompt_mask"], output["completion_mask"]], 1)[roots],
            ids.size(1),
        )
        valid = ~torch.isnan(scores)
        torch.testing.assert_close(
            scores[valid], -logps.detach().cpu()[:, : scores.size(1)][valid], rtol=1e-4, atol=1e-4
        )


def test_no_fork_after_the_final_answer_begins(tiny_model, tmp_path):
    trainer = branching_trainer(tiny_model, tmp_path, max_completion_length=16, branching_answer_marker="e")
    output, plan = one_round(trainer)
    tokenizer = trainer.processing_class
    seen_marker = False
    for g, tree in enumerate(plan.trees):
        for i in range(M, G):
            root = g * G + tree.parent[i]
            pieces = tokenizer.batch_decode(
                [[x] for x in output["completion_ids"][root, : tree.lengths[tree.parent[i]]]]
            )
            start = find_answer(pieces, "e")
            seen_marker |= start is not None
            assert tree.fork[i] == 0 or start is None or tree.fork[i] <= start
    assert seen_marker  # the marker occurred, so the limit was exercised


def test_tree_advantages_reach_the_loss_per_token(tiny_model, tmp_path):
    trainer = branching_trainer(tiny_model, tmp_path, max_completion_length=12, branching_advantage="tree")
    output, plan = one_round(trainer)
    texts = trainer.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
    rewards = torch.tensor(length_reward([[{"content": t}] for t in texts]))
    width = output["completion_ids"].size(1)
    expected = torch.cat(
        [tree_advantages(rewards[g * G : (g + 1) * G], tree, width, "sqrt") for g, tree in enumerate(plan.trees)]
    )
    assert output["advantages"].shape == output["completion_ids"].shape
    torch.testing.assert_close(output["advantages"], expected)
    before = snapshot(trainer.model)
    trainer.train()  # TRL's loss takes the (B, T) advantages
    assert changed(before, trainer.model)


class StubVLLMGeneration:
    """TRL's vLLM generation object as `_generate_single_turn` calls it: `generate(prompts=token ids, ...)` returning
    (prompt ids, completion ids, top-1 logprobs per token, logprob token ids), one completion per prompt given (the
    server dedups by `num_generations`, colocate samples each). Deterministic completions, recorded calls."""

    def __init__(self, max_completion_length, eos):
        self.max_completion_length, self.eos, self.calls = max_completion_length, eos, []

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        self.calls.append((list(map(list, prompts)), num_generations, self.max_completion_length))
        completions, logprobs = [], []
        for k, prompt in enumerate(prompts):
            n = max(2, self.max_completion_length - (k % 3))
            tokens = [10 + (sum(prompt) + 7 * k + j) % 200 for j in range(n - 1)] + [self.eos]
            completions.append(tokens[: self.max_completion_length])
            logprobs.append([[-0.01 * (j + 1)] for j in range(len(completions[-1]))])
        return prompts, completions, logprobs, None


def test_the_vllm_path_sends_token_ids_and_joins_the_logprobs(tiny_model, tmp_path):
    trainer = branching_trainer(tiny_model, tmp_path, max_completion_length=12)
    stub = StubVLLMGeneration(12, trainer.eos_token_ids[0])
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, stub, trainer.state.global_step
    trainer.model.train()
    prompts = [[5, 6, 7]] * G + [[8, 9]] * G
    completions, logprobs = trainer._generate_single_turn(prompts, None, {}, G)
    (root_prompts, root_n, root_limit), (branch_prompts, branch_n, branch_limit) = stub.calls
    assert root_prompts == [[5, 6, 7]] * M + [[8, 9]] * M and root_n == M and root_limit == 12
    plan = trainer._branching_plan
    forks = [plan.prefix[r] for r in range(len(prompts)) if r % G >= M]
    assert branch_n == 1 and branch_limit == 12 - min(forks) and stub.max_completion_length == 12  # restored
    for g, tree in enumerate(plan.trees):
        for i in range(M, G):
            row, root, t = g * G + i, g * G + tree.parent[i], tree.fork[i]
            assert branch_prompts[(row // G) * (G - M) + i - M] == prompts[row] + completions[root][:t]  # token ids
            assert completions[row][:t] == completions[root][:t] and len(completions[row]) <= 12
            assert logprobs[row][:t] == logprobs[root][:t] and len(logprobs[row]) == len(completions[row])


@pytest.mark.slow
def test_branching_off_trains_exactly_as_grpo_trainer(tiny_model, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    reference = GRPOTrainer(
        tiny_model,
        length_reward,
        args=trainer_args(tmp_path / "trl", config_class=GRPOConfig),
        train_dataset=prompt_dataset(),
    )
    start = snapshot(reference.model)
    reference.train()
    assert changed(start, reference.model)
    off = BranchingGRPOTrainer(
        tiny_model,
        length_reward,
        args=trainer_args(tmp_path / "off", config_class=BranchingGRPOConfig, branching=False),
        train_dataset=prompt_dataset(),
    )
    off.train()
    expected, got = snapshot(reference.model), snapshot(off.model)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert not any(k.startswith("branching/") for entry in off.state.log_history for k in entry)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(branching_roots=4), r"branching_roots must be an int in \[1, 3\]; got 4"),
        (dict(branching_roots=0), r"branching_roots must be an int in \[1, 3\]"),
        (dict(branching_roots=1, branching_per_fork=2), "do not add up to whole forks of branching_per_fork=2"),
        (dict(branching_score="logit"), "branching_score must be one of 'entropy', 'surprisal'"),
        (dict(branching_advantage="vine"), "branching_advantage must be one of 'group', 'tree'"),
        (dict(branching_tree_weighting="log"), "branching_tree_weighting must be one of 'none', 'sqrt'"),
        (dict(branching_min_distance=0), r"branching_min_distance must be an int >= 1"),
        (dict(branching_answer_marker=""), "branching_answer_marker must be a non-empty string or None"),
        (dict(branching_advantage="tree", loss_type="vespo"), "branching_advantage='tree' gives per-token"),
    ],
)
def test_bad_branching_settings_are_refused_at_construction(tmp_path, overrides, message):
    settings = {"branching": True, "branching_roots": M, "num_generations": G, **overrides}
    if not settings["branching"]:
        settings.pop("branching_roots")  # unused, so refused
    for config in (BranchingGRPOConfig, ForkingGRPOConfig):
        with pytest.raises(ValueError, match=message):
            trainer_args(tmp_path, config_class=config, **settings)


def test_each_process_must_grow_whole_groups(tmp_path):
    # with 2 processes and per_device_train_batch_size=6, a group of 4 would span both (TRL checks only the total)
    for config in (BranchingGRPOConfig, ForkingGRPOConfig):
        args = trainer_args(tmp_path, config_class=config, branching=True, num_generations=G)
        args.per_device_train_batch_size = 6
        with pytest.raises(ValueError, match=r"6 \* 1 = 6\) must be a multiple of num_generations \(4\)"):
            args.validate()


def test_unsupported_generation_setups_are_refused_by_the_trainer(tiny_model, tmp_path):
    def lookup(x: int) -> int:
        """Look a number up.

        Args:
            x: the number.
        """
        return x

    args = trainer_args(tmp_path, config_class=BranchingGRPOConfig, branching=True, num_generations=G)
    with pytest.raises(ValueError, match="branching=True does not support tools"):
        BranchingGRPOTrainer(tiny_model, length_reward, args=args, train_dataset=prompt_dataset(), tools=[lookup])
    with pytest.raises(ValueError, match="branching=True does not support rollout_func"):
        BranchingGRPOTrainer(
            tiny_model, length_reward, args=args, train_dataset=prompt_dataset(), rollout_func=lambda p, t: {}
        )
    other = trainer_args(tmp_path, config_class=ForkingGRPOConfig, branching=True, num_generations=G)
    from forking_trl import DynamicSamplingGRPOTrainer

    with pytest.raises(ValueError, match=r"DynamicSamplingGRPOTrainer does not implement branching=True"):
        DynamicSamplingGRPOTrainer(tiny_model, length_reward, args=other, train_dataset=prompt_dataset())


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["micro_batch", "batch"])
def test_the_forking_selection_sees_only_the_tokens_in_the_loss(tiny_model, tmp_path, scope):
    trainer = branching_trainer(
        tiny_model, tmp_path, ForkingGRPOTrainer, forking_mode="top", forking_ratio=0.3, forking_scope=scope
    )
    seen, select = [], trainer._select_and_record

    def record(entropies, mask, completion_ids):
        keep, scale = select(entropies, mask, completion_ids)
        seen.append((keep, mask))
        return keep, scale

    trainer._select_and_record = record
    trainer.train()
    assert seen and all(not (keep & ~mask.bool()).any() for keep, mask in seen)
    assert any((mask == 0).any() for _, mask in seen)  # the copied prefixes were masked out of the selection
    assert logged(trainer, "branching/forks_per_root") and logged(trainer, "forking/kept_fraction")


@pytest.mark.slow
def test_branching_composes_with_dynamic_sampling_an_entropy_method_and_tree_credit(tiny_model, tmp_path):
    trainer = branching_trainer(
        tiny_model,
        tmp_path,
        ForkingGRPOTrainer,
        reward=half_constant_reward,
        dynamic_sampling=True,
        branching_advantage="tree",
        entropy_method="kl_cov",
        loss_type="dapo",
        steps_per_generation=2,
        gradient_accumulation_steps=1,
        max_steps=3,
    )
    spy = AdvantageSpy(trainer)
    trainer.train()
    for numbers, advantages in spy.seen:  # only informative groups (odd prompts), per-token advantages
        assert all(n % 2 == 1 for n in numbers) and isinstance(advantages[0], list)
    assert logged(trainer, "dynamic_sampling/rounds") and logged(trainer, "branching/distinct_answers")
    assert max(logged(trainer, "kl_cov/penalty")) > 0


def sometimes_unscorable_reward(completions, **kwargs) -> list[float | None]:
    """None (unscorable, as accuracy_reward without a gold) for the second completion of each group of 4, else a
    reward with spread."""
    return [None if k % G == 1 else float(len(c[0]["content"]) % 5) + k % 2 for k, c in enumerate(completions)]


@pytest.mark.parametrize(
    "settings",
    [
        {"branching_advantage": "tree"},
        {"branching_advantage": "tree", "branching_tree_weighting": "none", "dynamic_sampling": True},
        {"branching_advantage": "group", "entropy_method": "clip_cov", "clip_cov_lb": -1e9, "clip_cov_ub": 1e9},
        {"branching_advantage": "tree", "entropy_method": "entropy_adv", "loss_type": "dapo"},
        {"branching_advantage": "tree", "entropy_method": "kl_cov", "loss_type": "dapo"},
    ],
    ids=["tree", "tree-dynamic", "group-clip_cov", "tree-entropy_adv", "tree-kl_cov"],
)
def test_an_unscorable_completion_never_turns_the_weights_to_nan(tiny_model, tmp_path, settings):
    # the bug: with tree credit one None reward made every advantage of its group NaN, and a step left every
    # parameter NaN with loss 0 and no warning
    trainer = branching_trainer(
        tiny_model, tmp_path, ForkingGRPOTrainer, reward=sometimes_unscorable_reward, max_steps=2, **settings
    )
    spy = AdvantageSpy(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(v) for v in logged(trainer, "grad_norm"))
    for _, advantages in spy.seen:
        assert torch.isfinite(torch.tensor(advantages)).all()


def test_an_infinite_reward_is_refused_with_tree_credit(tiny_model, tmp_path):
    def infinite(completions, **kwargs):
        return [math.inf if k == 0 else 1.0 for k in range(len(completions))]

    trainer = branching_trainer(tiny_model, tmp_path, reward=infinite, branching_advantage="tree")
    with pytest.raises(ValueError, match="non-finite reward"):
        one_round(trainer)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("trainer_name", ["BranchingGRPOTrainer", "ForkingGRPOTrainer", "DynamicSamplingGRPOTrainer"])
def test_every_trainer_trains_a_mixture_of_experts_model(tmp_path, kind, trainer_name):
    # the bug: a branch's prompt (prompt + prefix) is left-padded, and transformers' load-balancing loss breaks
    # generation from padded prompts ("The size of tensor a (2) must match the size of tensor b (18)"); two prompts
    # of different lengths per batch make plain GRPOTrainer fail the same way
    import forking_trl

    model = tiny_moe_model(tmp_path / "model", kind)
    trainer_class = getattr(forking_trl, trainer_name)
    settings = dict(num_generations=3, per_device_train_batch_size=6, max_completion_length=8, max_steps=2)
    if trainer_name != "DynamicSamplingGRPOTrainer":
        settings.update(branching=True, branching_roots=1)
    args = trainer_args(tmp_path / "out", config_class=trainer_class.config_class, **settings)
    trainer = trainer_class(model, length_reward, args=args, train_dataset=uneven_prompt_dataset())
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert logged(trainer, "aux_loss") and all(v > 0 for v in logged(trainer, "aux_loss"))  # still trained with it
    assert trainer.model.config.output_router_logits is True  # restored after each generation


@pytest.mark.slow
def test_branching_resumes_from_a_checkpoint_and_records_its_fields(tiny_model, tmp_path):
    import json

    kwargs = dict(max_steps=2, save_strategy="steps", save_steps=1)
    branching_trainer(tiny_model, tmp_path, ForkingGRPOTrainer, **kwargs).train()
    saved = json.loads((tmp_path / "checkpoint-1" / "forking_state.json").read_text())
    assert saved["branching"] is True and saved["branching_roots"] == M
    resumed = branching_trainer(tiny_model, tmp_path, ForkingGRPOTrainer, **{**kwargs, "max_steps": 3})
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 3 and len(logged(resumed, "branching/forks_per_root")) >= 1


@pytest.mark.slow
def test_lora_with_branching_trains_only_adapter_weights(tiny_model, tmp_path):
    from peft import LoraConfig

    args = trainer_args(tmp_path, config_class=BranchingGRPOConfig, num_generations=G, learning_rate=5e-2)
    trainer = BranchingGRPOTrainer(
        tiny_model,
        length_reward,
        args=args,
        train_dataset=prompt_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(before, trainer.model)
    assert moved and all("lora_" in name for name in moved) and logged(trainer, "branching/forks_per_root")


SCRIPT = __import__("pathlib").Path(__file__).resolve().parent / "scripts" / "train_branching.py"


def records_of(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


@pytest.mark.slow
def test_two_processes_branch_their_own_groups(tiny_model, tmp_path):
    """Plain branching with group credit, then forking with tree credit, in one launch of 2 processes (gloo)."""
    runs = [("plain", "group"), ("forking", "tree")]
    launch(
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        + ["--dynamo_backend", "no"],
        ["--model", tiny_model, "--output_dir", str(tmp_path), "--runs", *(f"{k}:{a}" for k, a in runs)],
        {"ACCELERATE_USE_CPU": "true"},
        script=SCRIPT,
    )
    for kind, advantage in runs:
        records = records_of(tmp_path / f"{kind}-{advantage}")
        assert len(records) == 2 and all(r["world_size"] == 2 and r["steps"] == 2 and r["changed"] for r in records)
        for record in records:
            assert record["rounds"]
            for round_ in record["rounds"]:
                completions, prefix = round_["completions"], round_["prefix"]
                for g, parents in enumerate(round_["parents"]):
                    for i in range(M, G):
                        row, root = g * G + i, g * G + parents[i]
                        assert completions[row][: prefix[row]] == completions[root][: prefix[row]]
        assert records[0]["metrics"] == records[1]["metrics"]  # reduced over both processes: the same numbers
        assert records[0]["rounds"][0]["completions"] != records[1]["rounds"][0]["completions"]


@pytest.mark.slow
def test_deepspeed_zero3_with_branching_on_cpu(tiny_model, tmp_path):
    pytest.importorskip("deepspeed")
    config = __import__("pathlib").Path(__file__).resolve().parents[1] / "accelerate_configs" / "zero3.yaml"
    launch(
        tmp_path,
        ["--config_file", str(config), "--num_processes", "1", "--mixed_precision", "no"],
        ["--model", tiny_model, "--output_dir", str(tmp_path), "--runs", "forking:group", "--max_steps", "1"],
        {"DS_ACCELERATOR": "cpu"},
        script=SCRIPT,
    )
    records = records_of(tmp_path / "forking-group")
    assert records and records[0]["deepspeed"] and records[0]["steps"] == 1 and records[0]["rounds"]
