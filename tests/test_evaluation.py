"""pass@k: the unbiased estimator against a brute-force count, the k ladder, and sampling on the tiny model."""

import itertools
import math

import pytest

from forking_trl.evaluation import pass_at_k, pass_at_k_curve, pass_at_k_ks, score_samples


def brute_force(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one: every subset counted."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_equals_the_brute_force_count_on_small_cases(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_limits():
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 64, 1) == 1.0
    assert pass_at_k(64, 16, 1) == pytest.approx(0.25)  # pass@1 is the share correct
    assert pass_at_k(64, 1, 64) == 1.0 and pass_at_k(64, 1, 32) == pytest.approx(0.5)
    assert pass_at_k(1000, 3, 500) == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500))
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError, match="0 <= c <= n and 1 <= k <= n"):
            pass_at_k(n, c, k)
    with pytest.raises(ValueError, match="k must be an int"):
        pass_at_k(4, 1, 1.5)


def test_the_k_ladder_and_the_curve():
    assert pass_at_k_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert pass_at_k_ks(48) == [1, 2, 4, 8, 16, 32, 48] and pass_at_k_ks(1) == [1]
    curve = pass_at_k_curve([0, 4, 8], n=8)
    assert list(curve) == [1, 2, 4, 8]
    assert curve[1] == pytest.approx((0 + 0.5 + 1) / 3) and curve[8] == pytest.approx(2 / 3)
    assert all(a <= b for a, b in zip(curve.values(), list(curve.values())[1:]))  # non-decreasing in k


def test_score_samples_skips_problems_without_gold():
    groups = [["The answer is \\boxed{4}.", "\\boxed{5}", "\\boxed{4}"], ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"]]
    scored = score_samples(groups, [{"solution": "4"}, {"solution": None}])
    assert scored["correct"] == [2] and scored["num_problems"] == 1 and scored["n"] == 3
    assert scored["pass_at_k"]["1"] == pytest.approx(2 / 3) and "coverage" not in scored  # one answer per problem


def test_sample_pass_at_k_on_the_tiny_model(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forking_trl.evaluation import sample_pass_at_k

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "solution": str(i + 1)} for i in range(3)]
    out = sample_pass_at_k(model, tokenizer, rows, n=4, max_new_tokens=6, batch_size=8)
    assert out["n"] == 4 and out["num_problems"] == 3 and len(out["correct"]) == 3
    assert list(out["pass_at_k"]) == ["1", "2", "4"]
    assert out["pass_at_k"] == {str(k): v for k, v in pass_at_k_curve(out["correct"], 4).items()}


def test_a_nan_grade_is_unscored_not_correct():
    # `if g` counted a NaN grade as a correct sample in pass@k and coverage@k
    groups = [["a", "b", "c", "d"]]
    scored = score_samples(groups, [{"solution": "4"}], graded=[[1.0, math.nan, 0.0, 0.0]])
    assert scored["correct"] == [1]
    assert score_samples(groups, [{"solution": "4"}], graded=[[math.nan] * 4])["num_problems"] == 0
