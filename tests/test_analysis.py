import json
import subprocess
import sys

import pytest
import torch

from forking_trl.analysis import ScoredCompletion, entropy_summary, overlap_summary, spearman
from forking_trl.cli import build_parser, main


def scored(values, ids=None):
    ids = ids or list(range(len(values)))
    return [ScoredCompletion("p", ids, [f"t{i}" for i in ids], values)]


def test_summary_on_known_values():
    values = [0.0] * 6 + [0.005, 1.0, 2.0, 3.0]  # 10 tokens, 7 below 0.01
    s = entropy_summary(scored(values, ids=[5, 5, 5, 5, 5, 5, 5, 9, 8, 9]), ratio=0.2)
    assert s["num_tokens"] == 10 and s["share_below_0.01"] == pytest.approx(0.7)
    assert s["top_threshold"] == 2.0  # the 2 highest: 3.0 and 2.0
    assert sorted((t["token"], t["count"]) for t in s["top_tokens"]) == [("t8", 1), ("t9", 1)]
    assert s["low_entropy_tokens"][0] == {"token": "t5", "count": 7, "mean_entropy": pytest.approx(0.005 / 7)}
    p = s["percentiles"]
    assert p["p50"] <= p["p80"] <= p["p90"] <= p["p95"] <= p["p99"]


def test_overlap_of_identical_and_different_entropies():
    a = scored([0.1, 2.0, 0.3, 5.0, 0.0, 1.0, 0.2, 0.4, 3.0, 0.5])
    assert overlap_summary(a, a)["overlap"] == 1.0
    b = scored([5.0, 0.1, 3.0, 0.2, 0.0, 1.0, 0.2, 0.4, 0.3, 2.0])
    result = overlap_summary(a, b, ratio=0.2)
    assert result["overlap"] == 0.0 and result["num_tokens"] == 10
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)


def test_help_explains_every_flag():
    parser = build_parser()
    for command in ("analyze", "overlap"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (command, action.option_strings)


@pytest.mark.slow
def test_analyze_end_to_end(tiny_model, tmp_path):
    main(
        [
            "analyze",
            "--model",
            tiny_model,
            "--dataset",
            "gsm8k",
            "--num-samples",
            "6",
            "--max-new-tokens",
            "12",
            "--output-dir",
            str(tmp_path),
            "--html-completions",
            "3",
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"num_tokens", "percentiles", "share_below_0.01", "top_tokens", "low_entropy_tokens"} <= set(summary)
    p = [summary["percentiles"][k] for k in ("p50", "p80", "p90", "p95", "p99")]
    assert p == sorted(p) and summary["num_tokens"] > 0
    assert summary["top_tokens"] and {"token", "count", "mean_entropy"} == set(summary["top_tokens"][0])
    assert (tmp_path / "entropy_histogram.png").stat().st_size > 5_000
    page = (tmp_path / "tokens.html").read_text()
    assert 0 < page.count("<span ") <= 3 * 12  # one span per token of the three completions shown
    assert page.count("<span ") == page.count("title='")


@pytest.mark.slow
def test_overlap_self_is_one_and_two_random_models_less(tiny_model, tmp_path):
    from forking_trl.tiny import build_tiny_model

    other = str(build_tiny_model(tmp_path / "other", seed=1))
    common = ["--dataset", "aime24", "--num-samples", "4", "--max-new-tokens", "16"]
    main(["overlap", "--base", tiny_model, "--other", tiny_model, *common, "--output-dir", str(tmp_path / "self")])
    assert json.loads((tmp_path / "self" / "overlap.json").read_text())["overlap"] == 1.0
    main(["overlap", "--base", tiny_model, "--other", other, *common, "--output-dir", str(tmp_path / "diff")])
    assert json.loads((tmp_path / "diff" / "overlap.json").read_text())["overlap"] < 1.0
    assert (tmp_path / "diff" / "overlap.png").stat().st_size > 5_000


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "forking_trl.cli", "analyze", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--max-new-tokens" in done.stdout


def test_top_level_help_shows_every_subcommands_flags():
    done = subprocess.run([sys.executable, "-m", "forking_trl.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--model", "--base", "--other", "--num-samples", "--max-new-tokens", "--html-completions"):
        assert flag in done.stdout, flag


def test_more_samples_than_problems_is_an_error(tiny_model, tmp_path):
    with pytest.raises(SystemExit, match="--num-samples 64 exceeds the 30 problems of 'aime24'"):
        main(
            ["analyze", "--model", tiny_model, "--dataset", "aime24", "--num-samples", "64"]
            + ["--output-dir", str(tmp_path)]
        )


def test_max_new_tokens_beyond_the_positions_is_an_error(tiny_model, tmp_path):
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(tiny_model).max_position_embeddings
    argv = ["--dataset", "aime24", "--num-samples", "2", "--max-new-tokens", str(limit), "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="max_position_embeddings"):
        main(["analyze", "--model", tiny_model, *argv])
    with pytest.raises(SystemExit, match="--max-new-tokens"):
        main(["overlap", "--base", tiny_model, "--other", tiny_model, *argv])


def test_outcome_summary_grades_each_completion_and_splits_the_pattern(tiny_model):
    from transformers import AutoTokenizer

    from forking_trl.analysis import ScoredCompletion, outcome_summary

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def completion(text, entropy):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return ScoredCompletion("p", ids, [tokenizer.decode([i]) for i in ids], [entropy] * len(ids))

    scored = [completion("So \\boxed{4}", 0.001), completion("So \\boxed{5}", 2.0), completion("\\boxed{7}", 1.0)]
    out = outcome_summary(scored, ["4", "4", None], tokenizer)  # the third has no gold: not graded
    assert out["accuracy"] == 0.5 and out["num_graded"] == 2
    right, wrong = out["by_outcome"]["right"], out["by_outcome"]["wrong"]
    assert right["share_below_0.01"] == 1.0 and wrong["share_below_0.01"] == 0.0
    assert right["num_completions"] == wrong["num_completions"] == 1 and "low_entropy_tokens" not in right
    assert outcome_summary(scored[2:], [None], tokenizer) == {"accuracy": None, "num_graded": 0, "by_outcome": {}}
