"""Countdown: the solver against brute force, the generator, the reward on hostile input, coverage@k."""

import itertools
import math
import threading
from fractions import Fraction

import pytest

from forking_trl.countdown import (
    MAX_DEPTH,
    CountdownSpec,
    canonical,
    check,
    combine,
    generate,
    number,
    parse,
    solutions,
)
from forking_trl.evaluation import coverage_at_k, pass_at_k
from forking_trl.rewards import countdown_answer, countdown_reward


def brute_force(nums, target, ops="+-*/"):
    """Every reverse-Polish program over a permutation of `nums` and any operators, evaluated; the canonical forms
    (commutativity of + and *) of those that equal `target`. Independent of the solver's recursion over splits."""
    found = set()
    n = len(nums)
    for perm in set(itertools.permutations(nums)):
        for ops_seq in itertools.product(ops, repeat=n - 1):
            # positions: after the i-th number, how many operators to apply (a valid RPN shape)
            for shape in itertools.product(range(n), repeat=n):
                if sum(shape) != n - 1 or shape[0] != 0:
                    continue
                stack, k, ok = [], 0, True
                for x, applies in zip(perm, shape):
                    stack.append(number(x))
                    for _ in range(applies):
                        if len(stack) < 2:
                            ok = False
                            break
                        b, a = stack.pop(), stack.pop()
                        e = combine(ops_seq[k], a, b)
                        k += 1
                        if e is None:
                            ok = False
                            break
                        stack.append(e)
                    if not ok:
                        break
                if ok and len(stack) == 1 and k == n - 1 and stack[0].value == target:
                    found.add(stack[0].canonical)
    return found


@pytest.mark.parametrize(
    "nums, target, ops",
    [
        ([2, 3, 4], 10, "+-*/"),
        ([1, 2, 3], 6, "+-*"),
        ([5, 5, 2], 5, "+-*/"),
        ([7, 2, 4], 14, "+-*/"),
        ([3, 3, 8, 8], 24, "+-*/"),
        ([1, 1], 2, "+-"),
    ],
)
def test_the_solver_lists_exactly_the_solutions_brute_force_finds(nums, target, ops):
    listed = solutions(nums, target, ops)
    assert len(set(map(canonical, listed))) == len(listed)  # distinct up to commutativity
    assert set(map(canonical, listed)) == brute_force(nums, target, ops)
    for text in listed:
        assert check(text, nums, target, ops) == (True, "correct")


def test_distinct_means_up_to_commutativity_not_associativity():
    assert canonical("(1 + 2) * 3") == canonical("3 * (2 + 1)")
    assert canonical("(1 + 2) + 3") != canonical("1 + (2 + 3)")  # another pair combined first: another path
    assert canonical("8 / 2") != canonical("2 / 8") and canonical("1+2*3") == canonical("1 + (2 * 3)")
    assert solutions([3, 3, 8, 8], 24) == ["8 / (3 - (8 / 3))"]  # the classic: only through a fraction


def test_generated_problems_are_solvable_in_range_and_deterministic():
    spec = CountdownSpec(num_count=3, low=1, high=9, target_low=1, target_high=99, operations="+-*")
    problems = generate(spec, 30, seed=3)
    assert problems == generate(spec, 30, seed=3) and problems != generate(spec, 30, seed=4)
    for p in problems:
        assert len(p["nums"]) == 3 and all(1 <= x <= 9 for x in p["nums"]) and 1 <= p["target"] <= 99
        assert p["solutions"] and all(check(s, p["nums"], p["target"], "+-*")[0] for s in p["solutions"])
    assert max(len(p["solutions"]) for p in problems) > 1  # several solutions: something to explore
    with pytest.raises(ValueError, match="2 to 5 numbers"):
        CountdownSpec(num_count=6)
    with pytest.raises(ValueError, match="operations must be a non-empty subset"):
        CountdownSpec(operations="+^")
    with pytest.raises(ValueError, match="no solvable problem"):
        generate(CountdownSpec(num_count=2, low=1, high=1, target_low=50, target_high=60), 1)


def test_the_rules_as_tinyzero_has_them():
    assert check("7/2*4", [7, 2, 4], 14)[0]  # exact rational arithmetic through a fraction
    assert check("7 ÷ 2 × 4", [7, 2, 4], 14)[0]
    assert check("(2+3)*2", [2, 2, 3], 10)[0]  # a repeated number used as often as given
    assert check("2+2", [2, 3], 4) == (False, "uses [2, 2], not each of [2, 3] exactly once")
    assert not check("2+3", [2, 3, 4], 5)[0]  # every number must be used
    assert check("2*3", [2, 3], 6, "+-") == (False, "uses *, not allowed")
    assert check("1/0+1", [1, 0, 1], 1) == (False, "division by zero")
    assert check("6/(2-2)", [6, 2, 2], 1) == (False, "division by zero")
    assert not check("-2+3", [2, 3], 1)[0]  # no unary minus: every number is a given one
    assert not check("2.5*2", [2, 5, 2], 5)[0] and not check("2 ** 3", [2, 3], 8)[0]
    assert not check("__import__('os')", [1], 1)[0]  # a grammar, never eval


@pytest.mark.parametrize(
    "answer",
    [
        "<answer>9 \u2212 7</answer>",  # U+2212, the minus sign (was "unexpected character")
        "<answer>9 \u2013 7</answer>",  # an en dash
        "\\boxed{9 - 7}",
        "\\boxed{(9 - 7) \\times 1}",
        "\\boxed{(9 - 7) \\cdot 1}",
        "\\boxed{(9 - 7) \\div 1}",
        "\\boxed{\\frac{9 - 7}{1}}",
        "\\boxed{\\dfrac{9 - 7}{1}}",
        "\\boxed{\\left(9 - 7\\right) \\times 1}",
        "\\boxed{[9 - 7] \\cdot 1}",
        "\\boxed{\\{9 - 7\\} \\times 1}",
        "\\boxed{{9 - 7} \\times 1}",
        "<answer>$(9 - 7) \\times 1$</answer>",
        "<answer>\\((9-7)\\,\\cdot\\,1\\)</answer>",
        "<answer>(9 - 7) \u00b7 1</answer>",  # middle dot
        "<answer>(9 - 7) \u22c5 1</answer>",  # dot operator
        "<answer>(9 - 7) × 1</answer>",
        "<answer>(9 - 7) ÷ 1</answer>",
    ],
)
def test_the_reward_reads_the_spellings_models_write(answer):
    nums = [9, 7] if answer.count("1") == 0 else [9, 7, 1]  # "9 - 7" alone, or times / over 1
    assert countdown_reward([answer], [nums], [2]) == [1.0]


def test_every_spelling_of_a_solution_is_one_solution():
    spellings = ["(3 + 5) * 7", "(3 + 5) \\times 7", "\\left(3+5\\right)\\cdot 7", "[5 + 3] × 7", "7·{3+5}"]
    assert {canonical(s) for s in spellings} == {canonical("7 * (5 + 3)")}
    assert canonical("\\frac{9}{3}") == canonical("9 / 3") and canonical("9 \u2212 3") == canonical("9 - 3")


def test_spellings_do_not_open_the_rules():
    from forking_trl.countdown import Rejected

    for text, message in [
        ("(3 + 5] * 7", "unclosed '\\('"),  # brackets close by their own kind
        ("\\frac{1}{0}", "division by zero"),
        ("\\sqrt{4}", "unexpected command '\\\\\\\\sqrt'"),
        ("3 x 4", "unexpected character 'x'"),
        ("\\frac{3}", "ends early"),
        ("\\frac" * (MAX_DEPTH + 1) + "{1}{1}" * (MAX_DEPTH + 1), "nested deeper"),
        ("\u2212 3 + 5", "unexpected '-'"),  # a minus sign is still no unary minus
    ]:
        with pytest.raises(Rejected, match=message):
            parse(text)
    assert not check("3 \\times\\times 4", [3, 4], 12)[0]  # ** by another name


def within(seconds, fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    return out[0]


@pytest.mark.parametrize(
    "text",
    [
        "<answer>" + "9" * 1_000_000 + "</answer>",  # a huge number
        "<answer>" + "(" * 100_000 + "1" + ")" * 100_000 + "</answer>",  # deep nesting
        "<answer>" + "(" * 17 + "1+2" + ")" * 17 + "</answer>",  # deeper than 16, within the length cap
        "<answer>" * 200_000,  # a megabyte of unclosed tags
        "\\boxed{" * 150_000,
        "<answer>" + "1+" * 500_000 + "2</answer>",
    ],
)
def test_the_reward_is_bounded_on_hostile_input(text):
    assert within(15, lambda: countdown_reward([text], [[1, 2]], [3])) == [0.0]


def test_the_reward_reads_tinyzeros_columns_and_answer_formats():
    completions = [
        "<think>2 and 3 make 5, times 2</think><answer>(2 + 3) * 2</answer>",
        "so \\boxed{(2+3)*2 = 10}",  # its left side
        [{"role": "assistant", "content": "<answer>2*(3+2)</answer>"}],  # chat messages
        "<answer>(2+3)*2</answer> then <answer>2+3+2</answer>",  # the last answer counts
        "no answer",
    ]
    assert countdown_reward(completions, [[2, 3, 2]] * 5, [10] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert countdown_reward(["<answer>1+2</answer>"], [None], [3]) == [None]  # a missing problem: skipped
    assert countdown_answer("<answer> 3*4 = 12 </answer>") == "3*4"
    with pytest.raises(ValueError, match="check that the dataset has `nums` and `target` columns"):
        countdown_reward(["x", "y"], [[1, 2]], [3])


def test_parse_refuses_beyond_its_limits():
    from forking_trl.countdown import MAX_DEPTH, Rejected

    assert parse("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH).value == Fraction(1)
    with pytest.raises(Rejected, match="nested deeper"):
        parse("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(Rejected, match="longer than 200"):
        parse("1" + "+1" * 100)
    with pytest.raises(Rejected, match="unclosed"):
        parse("(1+2")


def test_coverage_at_k_equals_the_brute_force_expectation():
    # 8 samples: solution A 3 times, B once, 4 wrong; coverage@k = expected distinct solutions among k of them
    samples = ["A"] * 3 + ["B"] + [None] * 4
    for k in range(1, 9):
        subsets = list(itertools.combinations(range(8), k))
        expected = sum(len({samples[i] for i in s} - {None}) for s in subsets) / len(subsets)
        assert coverage_at_k([3, 1], 8, k) == pytest.approx(expected)
    assert coverage_at_k([3, 1], 8, 1) == pytest.approx(4 / 8)  # coverage@1 is the accuracy
    assert coverage_at_k([3, 1], 8, 8) == 2  # coverage@n: the solutions found
    assert coverage_at_k([], 8, 4) == 0 and coverage_at_k([8], 8, 3) == pass_at_k(8, 8, 3) == 1.0
    with pytest.raises(ValueError, match="sum to at most n=4"):
        coverage_at_k([3, 2], 4, 1)
    assert math.isclose(coverage_at_k([2, 2], 4, 2), 2 * pass_at_k(4, 2, 2))


def test_the_reward_follows_an_operations_column_when_the_dataset_has_one():
    """forking_trl.tasks.Countdown writes `operations` per row; without the column all four are allowed (TinyZero)."""
    text = "<answer>2 * 3 + 4</answer>"
    assert countdown_reward([text, text], [[2, 3, 4]] * 2, [10] * 2) == [1.0, 1.0]
    assert countdown_reward([text, text], [[2, 3, 4]] * 2, [10] * 2, operations=["+-", "+-*"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="operations"):
        countdown_reward([text], [[2, 3, 4]], [10], operations=["+-", "+-*"])


def test_worked_completions_show_each_step_and_box_the_solution():
    from forking_trl.countdown import worked

    assert worked("(3 + 5) * 7") == "3 + 5 = 8. 8 * 7 = 56. The answer is \\boxed{(3 + 5) * 7}."
    assert worked("9 - 2 * 3") == "2 * 3 = 6. 9 - 6 = 3. The answer is \\boxed{9 - (2 * 3)}."
    assert worked("7 / 2 * 4").startswith("7 / 2 = 7/2. 7/2 * 4 = 14.")
    for problem in generate(CountdownSpec(), 50, seed=4):
        for solution in problem["solutions"]:
            assert countdown_reward([worked(solution)], [problem["nums"]], [problem["target"]]) == [1.0]


def test_min_solutions_keeps_only_problems_with_that_many():
    problems = generate(CountdownSpec(min_solutions=3), 100, seed=1)
    assert all(len(p["solutions"]) >= 3 for p in problems)
    with pytest.raises(ValueError, match="min_solutions"):
        CountdownSpec(min_solutions=0)
    with pytest.raises(ValueError, match="no solvable problem"):
        generate(CountdownSpec(num_count=2, high=1, min_solutions=5), 1)
