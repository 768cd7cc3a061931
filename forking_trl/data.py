"""Math RL datasets normalised to `prompt` (chat messages) + `solution` (the gold final answer).

Schemas recognised, by their columns:
- DAPO-Math-17k: chat `prompt`, gold in `reward_model.ground_truth`;
- MATH / MATH-500 / AIME / AMC / Minerva / OlympiadBench: `problem` + `answer` (or `problem` + a worked `solution`
  whose last `\\boxed{}` is the gold);
- GSM8K: `question` + `answer`, the gold after `####`;
- already normalised: `prompt` (text or chat) + `solution`.

Sources: a local `.jsonl` / `.json` / `.parquet` file, a bundled benchmark name (`aime24`, `aime25`, `amc23`,
`math500`, `minervamath`, `olympiadbench`, `gsm8k`, `gsm8k_train`; shipped in `forking_trl/bundled_data/`,
provenance in its README), or a Hugging Face Hub dataset id (needs network).
"""

from __future__ import annotations

import re
from pathlib import Path

from .rewards import last_boxed

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

DATA_DIR = Path(__file__).resolve().parent / "bundled_data"
BUNDLED = {
    "aime24": "benchmarks/aime24.jsonl",
    "aime25": "benchmarks/aime25.jsonl",
    "amc23": "benchmarks/amc23.jsonl",
    "math500": "benchmarks/math500.jsonl",
    "minervamath": "benchmarks/minervamath.jsonl",
    "olympiadbench": "benchmarks/olympiadbench.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    "gsm8k_train": "gsm8k/train.jsonl",
}
BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minervamath", "olympiadbench")


def with_instruction(problem: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """Append the instruction once: never when the problem already says how to give the final answer."""
    problem = problem.strip()
    if not instruction:
        return problem
    squashed = " ".join(problem.split())
    if " ".join(instruction.split()) in squashed or "\\boxed" in problem or "Answer:" in problem:
        return problem
    return f"{problem}\n{instruction}"


def gsm8k_gold(answer: str) -> str:
    """GSM8K's gold: the text after `####`, without thousands separators."""
    return answer.split("####")[-1].strip().replace(",", "")


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_worked(answer: str) -> str:
    """GSM8K's worked solution as a completion in this project's answer format: the calculator annotations removed
    (`48/2 = <<48/2=24>>24` -> `48/2 = 24`), the final `#### 72` written `The answer is \\boxed{72}.`"""
    work, _, gold = answer.rpartition("####")
    work = _CALCULATOR.sub("", work).strip()
    return f"{work}\nThe answer is \\boxed{{{gsm8k_gold(gold)}}}."


def worked_example(example: dict, index: int | None = None, instruction: str | None = DEFAULT_INSTRUCTION) -> dict:
    """One row with a worked solution to TRL's conversational prompt-completion form (supervised fine-tuning):
    `{"prompt": [user], "completion": [assistant], "solution": gold}`. GSM8K (`question` + `answer`: its worked
    `gsm8k_worked`) and MATH (`problem` + a worked `solution` ending in a box); any other schema has no worked
    solution and is a `ValueError` naming the columns."""
    where = f"row {index}" if index is not None else "a row"
    if "question" in example and "answer" in example and "####" in str(example["answer"]):  # GSM8K
        worked = gsm8k_worked(_required(example["answer"], where, "answer"))
    elif "problem" in example and last_boxed(str(example.get("solution") or "")):  # MATH with worked solutions
        worked = _required(example["solution"], where, "solution")
    else:
        raise ValueError(
            f"{where}: no worked solution in columns {sorted(example)}; supervised fine-tuning needs question+answer "
            "with '#### gold' (GSM8K) or problem+solution with a \\boxed{} answer (MATH)."
        )
    row = normalize_example(example, index, instruction)
    return {**row, "completion": [{"role": "assistant", "content": worked}]}


def normalize_example(example: dict, index: int | None = None, instruction: str | None = DEFAULT_INSTRUCTION) -> dict:
    """One row of any recognised schema to `{"prompt": [{"role": "user", ...}], "solution": str}`.

    The schema is chosen by the columns present; a row of that schema whose problem or gold is missing (`None`,
    empty) is a `ValueError` naming the row (`index`, when given) and the field, never a gold of `'None'`.
    """
    where = f"row {index}" if index is not None else "a row"
    if isinstance(example.get("reward_model"), dict) and "ground_truth" in example["reward_model"]:  # DAPO
        text = _user_text(example.get("prompt"), where, "prompt")
        gold = _required(example["reward_model"]["ground_truth"], where, "reward_model.ground_truth")
    elif "problem" in example and ("answer" in example or "solution" in example):  # MATH, MATH-500, AIME, AMC, ...
        text = _required(example["problem"], where, "problem")
        if not _missing(example.get("answer")):
            gold = str(example["answer"])
        else:  # MATH with worked solutions: the gold is the last box
            solution = _required(example.get("solution"), where, "answer' or 'solution")
            gold = last_boxed(solution) or solution
    elif "question" in example and "answer" in example:  # GSM8K
        text = _required(example["question"], where, "question")
        gold = gsm8k_gold(_required(example["answer"], where, "answer"))
    elif "prompt" in example and "solution" in example:
        text = _user_text(example["prompt"], where, "prompt")
        gold = _required(example["solution"], where, "solution")
    else:
        raise ValueError(
            f"unrecognised math dataset schema with columns {sorted(example)}; expected one of: prompt+reward_model "
            "(DAPO), problem+answer (MATH/AIME/AMC), problem+solution (MATH), question+answer (GSM8K), "
            "prompt+solution."
        )
    return {"prompt": _chat(with_instruction(text, instruction)), "solution": gold}


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _required(value, where: str, field: str) -> str:
    """`value` as a string, or a `ValueError` naming the row and the field when it is missing."""
    if _missing(value):
        raise ValueError(f"{where}: field '{field}' is missing ({value!r}); fix or drop the row.")
    return str(value)


def _user_text(prompt, where: str = "a row", field: str = "prompt") -> str:
    if isinstance(prompt, str) or prompt is None:
        return _required(prompt, where, field)
    users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError(f"{where}: field '{field}' is a chat without a user message")
    return _required(users[-1], where, f"{field}[user].content")


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def load_math_dataset(
    source: str,
    split: str = "train",
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    limit: int | None = None,
    seed: int = 0,
    worked: bool = False,
):
    """Load a math dataset from a file, a bundled name, or the Hub, normalised to `prompt` + `solution`; `worked`:
    with its worked solutions as an assistant `completion` too (`worked_example`, for supervised fine-tuning)."""
    from datasets import load_dataset

    path = Path(source)
    if source in BUNDLED:
        path = DATA_DIR / BUNDLED[source]
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.exists():
            raise FileNotFoundError(f"dataset file {str(path)!r} not found")
        dataset = load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(source, split=split)
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(limit))
    return dataset.map(
        worked_example if worked else normalize_example,
        with_indices=True,
        fn_kwargs={"instruction": instruction},
        remove_columns=dataset.column_names,
    )
