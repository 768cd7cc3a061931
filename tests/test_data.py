import json

import pytest

from forking_trl.data import DEFAULT_INSTRUCTION, load_math_dataset, normalize_example


def test_dapo_schema():
    row = {
        "prompt": [{"role": "user", "content": "Solve x. The last line should be of the form Answer: $Answer"}],
        "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
        "data_source": "math_dapo",
    }
    out = normalize_example(row)
    assert out["solution"] == "34" and out["prompt"][0]["content"].count("Answer:") == 1
    assert DEFAULT_INSTRUCTION not in out["prompt"][0]["content"]  # it already says how to answer


def test_math_aime_amc_schema_adds_instruction_once():
    out = normalize_example({"problem": "Find $x$.", "answer": "\\frac{1}{2}"})
    assert out == {
        "prompt": [{"role": "user", "content": f"Find $x$.\n{DEFAULT_INSTRUCTION}"}],
        "solution": "\\frac{1}{2}",
    }
    again = normalize_example({"problem": out["prompt"][0]["content"], "answer": "1"})
    assert again["prompt"][0]["content"].count(DEFAULT_INSTRUCTION) == 1


def test_math_worked_solution_and_gsm8k():
    assert normalize_example({"problem": "p", "solution": "so $\\boxed{7}$."})["solution"] == "7"
    gsm = normalize_example({"question": "How many?", "answer": "48/2 = <<48/2=24>>24\n#### 1,024"})
    assert gsm["solution"] == "1024" and gsm["prompt"][0]["content"].startswith("How many?")


def test_unknown_schema_names_the_columns():
    with pytest.raises(ValueError, match="text"):
        normalize_example({"text": "hi"})


def test_local_jsonl_and_bundled(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(5)))
    data = load_math_dataset(str(path))
    assert len(data) == 5 and data[3]["solution"] == "3"
    aime = load_math_dataset("aime24")
    assert len(aime) == 30 and aime[0]["prompt"][0]["content"].count(DEFAULT_INSTRUCTION) == 1
    assert len(load_math_dataset("math500", limit=7)) == 7


@pytest.mark.parametrize(
    "row, field",
    [
        ({"problem": "Find x.", "answer": None}, "'answer' or 'solution'"),
        ({"problem": None, "answer": "3"}, "'problem'"),
        ({"problem": "Find x.", "answer": None, "solution": None}, "'answer' or 'solution'"),
        ({"question": "How many?", "answer": None}, "'answer'"),
        ({"prompt": "What?", "solution": None}, "'solution'"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": None}},
            "'reward_model.ground_truth'",
        ),
    ],
)
def test_missing_problem_or_gold_names_the_row_and_field(row, field):
    with pytest.raises(ValueError, match=f"row 7: field {field}"):
        normalize_example(row, 7)


def test_load_names_the_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"problem": "p0", "answer": "1"}, {"problem": "p1", "answer": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="row 1: field 'answer' or 'solution'"):
        load_math_dataset(str(path))
