import json

import pytest

from forking_trl.data import DEFAULT_INSTRUCTION, gsm8k_worked, load_math_dataset, normalize_example, worked_example


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


def test_gsm8k_worked_solution_drops_calculator_annotations_and_boxes_the_gold():
    answer = "She sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert gsm8k_worked(answer) == "She sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\nThe answer is \\boxed{1072}."


def test_worked_example_is_a_prompt_completion_row_with_the_prompt_of_normalize_example():
    gsm = {"question": "How many clips?", "answer": "48+24 = <<48+24=72>>72\n#### 72"}
    row = worked_example(gsm, 3)
    assert row["prompt"] == normalize_example(gsm, 3)["prompt"] and row["solution"] == "72"
    assert row["completion"] == [{"role": "assistant", "content": "48+24 = 72\nThe answer is \\boxed{72}."}]
    math = {"problem": "Find $x$.", "solution": "Halve it: $x = \\boxed{\\frac{1}{2}}$."}
    row = worked_example(math)
    assert row["completion"][0]["content"] == math["solution"] and row["solution"] == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "row",
    [
        {"problem": "Find x.", "answer": "3"},  # AIME: a gold answer, no worked solution
        {"problem": "Find x.", "solution": "x is three"},  # a solution without a boxed answer
        {"question": "How many?", "answer": "3"},  # GSM8K-like without '#### gold'
        {"text": "hi"},
    ],
)
def test_worked_example_without_a_worked_solution_names_the_row_and_columns(row):
    with pytest.raises(ValueError, match=r"row 5: no worked solution in columns \[.*'(problem|question|text)'"):
        worked_example(row, 5)


def test_load_worked_gives_prompt_completion_solution(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        "\n".join(json.dumps({"question": f"q{i}", "answer": f"{i}+0 = <<{i}+0={i}>>{i}\n#### {i}"}) for i in range(4))
    )
    data = load_math_dataset(str(path), worked=True)
    assert set(data.column_names) == {"prompt", "completion", "solution"}
    assert data[2]["completion"][0]["content"] == "2+0 = 2\nThe answer is \\boxed{2}." and data[2]["solution"] == "2"
    assert len(load_math_dataset("gsm8k_train", worked=True, limit=3)) == 3
