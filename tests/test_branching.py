"""Branching rollouts: the pure decisions on hand-built tensors (forks, trees), then the trainers (tests below)."""

import math

import pytest
import torch

from forking_trl.branching import (
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


def test_group_tree_refuses_a_malformed_shape():
    with pytest.raises(ValueError, match="row 1 is a root"):
        GroupTree(num_roots=2, parent=(0, 0, 0), fork=(0, 0, 1), lengths=(3, 3, 3))
    with pytest.raises(ValueError, match="branch 2 must fork from a root, inside it"):
        GroupTree(num_roots=2, parent=(0, 1, 0), fork=(0, 0, 3), lengths=(3, 3, 4))
