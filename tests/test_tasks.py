"""Tasks: one home for each task's rows, reward, grading and held-out split; the answer-level measures."""

import hashlib
import json
import math

import pytest

from forking_trl.countdown import CountdownSpec, check
from forking_trl.evaluation import score_samples
from forking_trl.tasks import Arithmetic, Chain, Countdown, MathDataset, answer_diversity, get_task


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def test_chain_and_arithmetic_rows_are_those_the_experiments_ran_on():
    """The rows are bit for bit those of `forking_trl.data.synthetic_chain` / `synthetic_arithmetic` before the tasks
    moved here (hashes computed with that code), so the ablation's and the collapse study's results still hold."""
    train, held = Chain().split(20000, 200)
    assert digest([train, held]) == "42ddd5c7e65c8fc3"
    assert digest(Arithmetic().rows(4096, 1)) == "8c3bdd005c9eb3ae"
    # the exploration experiment's rows (docs/explore): its recipe's Countdown settings and sizes
    assert digest(Countdown(CountdownSpec(min_solutions=2)).split(20000, 200)) == "2d7008fe08cdcb65"
    for row in Arithmetic().rows(50, 1):
        assert row["completion"].endswith(f"\\boxed{{{row['solution']}}}.")


def test_an_instruction_follows_each_question_and_is_recorded_in_the_settings():
    """`instruction` (for a pretrained instruct model): the same problems, the sentence after each question; the rows
    without one are unchanged (the hashes above), and the settings name it only when it is set."""
    plain, told = Arithmetic(max_operand=20), Arithmetic(max_operand=20, instruction="Answer with just the number.")
    for a, b in zip(plain.rows(20, 1), told.rows(20, 1)):
        assert b["prompt"][0]["content"] == a["prompt"][0]["content"] + " Answer with just the number."
        assert (b["solution"], b["completion"]) == (a["solution"], a["completion"])
    assert plain.settings() == {"max_operand": 20}
    assert told.settings() == {"max_operand": 20, "instruction": "Answer with just the number."}
    chain = Chain(instruction="Be brief.").rows(3, 1)
    assert all(r["prompt"][0]["content"].endswith("? Be brief.") for r in chain)
    assert (
        Chain(instruction="Be brief.").settings()["instruction"] == "Be brief."
        and "instruction" not in Chain().settings()
    )


def test_a_generated_tasks_held_out_problems_never_meet_training():
    with pytest.raises(ValueError, match="no held-out problem is left"):
        Chain(max_operand=3).split(3000, 50)  # 256 problems in all: training covers every one
    for task in (Chain(), Countdown(CountdownSpec(min_solutions=2))):
        train, held = task.split(3000, 50)
        assert len(held) == 50
        prompts = {json.dumps(r["prompt"]) for r in train}
        assert not prompts & {json.dumps(r["prompt"]) for r in held}
    # Countdown's held-out problems are distinct, and none of them is drawn for training however many are drawn
    keys = [(tuple(r["nums"]), r["target"]) for r in held]
    assert len(set(keys)) == len(keys)


def test_countdown_rows_carry_every_solution_and_one_drawn_uniformly():
    task = Countdown(CountdownSpec(min_solutions=2), seed=3)
    train, _ = task.split(4000, 10)
    assert all(len(r["solutions"]) >= 2 for r in train)
    for row in train[:200]:
        answer = row["completion"].rsplit("\\boxed{", 1)[1].rstrip("}.")
        assert check(answer, row["nums"], row["target"], row["operations"])[0]  # the worked answer is right
        assert task.grade([row["completion"]], [row]) == [1.0]
    # the drawn solution is uniform over the problem's solutions: on problems with exactly two, each half the time
    two = [r for r in train if len(r["solutions"]) == 2]
    first = sum(r["completion"].endswith(f"\\boxed{{{r['solutions'][0]}}}.") for r in two)
    assert len(two) > 400 and abs(first / len(two) - 0.5) < 0.08
    assert list(task.training_rows(train[:1])[0]) == ["prompt", "nums", "target", "operations"]


def test_countdown_grading_follows_the_rows_operations():
    row = Countdown(CountdownSpec(operations="+-")).rows(1, seed=0)[0]
    nums = row["nums"]
    product = f"\\boxed{{{nums[0]} * {nums[1]} * {nums[2]}}}"
    row = {**row, "target": nums[0] * nums[1] * nums[2]}
    assert Countdown().grade([product], [row]) == [0.0]  # × is not one of this row's operations
    assert Countdown().grade([product], [{**row, "operations": "+-*"}]) == [1.0]


def test_countdown_answers_are_the_same_up_to_commutativity():
    task = Countdown()
    row = {"nums": [3, 5, 7], "target": 56, "operations": "+-*", "solutions": ["(3 + 5) * 7"]}
    keys = {task.answer_key(t, row) for t in ["\\boxed{(3 + 5) * 7}", "x \\boxed{7 * (5 + 3)}", "\\boxed{(5+3)*7}"]}
    assert len(keys) == 1 and task.answer_key("no answer", row) is None
    assert task.answer_key("\\boxed{3 + (5 + 7)}", row) != task.answer_key("\\boxed{(3 + 5) + 7}", row)


def test_coverage_and_diversity_on_hand_built_samples():
    """4 samples of a problem with 3 solutions: solution A twice (written two ways), B once, one wrong answer; of a
    second problem: nothing right, the same wrong answer 4 times."""
    task = Countdown()
    p1 = {
        "nums": [1, 2, 3],
        "target": 6,
        "operations": "+-*",
        "solutions": ["(1 + 2) + 3", "1 + (2 + 3)", "1 * 2 * 3"],
    }
    p2 = {"nums": [2, 2, 9], "target": 36, "operations": "+-*", "solutions": ["(2 * 2) * 9"]}
    s1 = ["\\boxed{(1 + 2) + 3}", "\\boxed{3 + (2 + 1)}", "\\boxed{(1 * 2) * 3}", "\\boxed{1 + 2 - 3}"]
    s2 = ["\\boxed{2 + 2 + 9}"] * 4
    scored = score_samples([s1, s2], [p1, p2], task)
    assert scored["correct"] == [3, 0]
    cov = scored["coverage"]
    # problem 1: A seen 2 of 4 -> among k=1 with 1/2, k=2 with 1 - C(2,2)/C(4,2) = 5/6; B seen 1 -> 1/4, 1/2; k=4: 2
    assert cov["coverage_at_k"]["1"] == pytest.approx((0.5 + 0.25) / 2)
    assert cov["coverage_at_k"]["2"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert cov["coverage_at_k"]["4"] == pytest.approx(2 / 2)
    assert cov["found"] == [2, 0] and cov["solutions"] == [3, 1] and cov["solutions_per_problem"] == 2
    assert cov["coverage_at_k"]["1"] == pytest.approx(scored["pass_at_k"]["1"])  # coverage@1 is the accuracy
    answers = scored["answers"]
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # answers A, A, B, wrong
    assert answers["distinct_answers"] == pytest.approx((3 + 1) / 2)
    assert answers["answer_entropy"] == pytest.approx(h1 / 2)


def test_answer_diversity_counts_no_answer_in_the_entropy_only():
    d = answer_diversity([[None, None, "a", "b"]])
    assert d["distinct_answers"] == 2
    assert d["answer_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_get_task_by_name():
    assert isinstance(get_task("chain", max_operand=5), Chain) and get_task("chain", max_operand=5).max_operand == 5
    countdown = get_task("countdown", num_count=4, high=6)
    assert countdown.spec.num_count == 4 and countdown.settings()["countdown_high"] == 6
    assert isinstance(get_task("aime24"), MathDataset)
    with pytest.raises(ValueError, match="needs eval_dataset"):
        get_task("aime24").split(10, 10)
    with pytest.raises(ValueError, match="min_solutions"):
        get_task("countdown", min_solutions=0)
