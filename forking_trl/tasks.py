"""Tasks: what a model trains and is measured on, in one place.

A task is a problem generator or a dataset, the prompt, the gold, worked completions for a supervised warm start,
the reward, and a held-out split that never meets training. The experiment runner (`forking_trl.ablation`), the demo
and `examples/evaluate.py` ask a task for their rows, their reward and their grading; nothing else knows a task's
details.

- `Arithmetic`: one +/- operation with a worked answer (the offline demo's).
- `Chain`: two-step +/- arithmetic with a worked chain (the ablation's and the collapse study's); one valid path.
- `Countdown`: reach a target from given numbers (`forking_trl.countdown`); several solutions per problem, so its
  answers have an identity (`answer_key`, the expression up to commutativity) and coverage of its solutions is
  measured (`several_solutions`).
- `MathDataset`: any dataset `forking_trl.data.load_math_dataset` reads, held out against another.

A row is a dict with `prompt` (chat messages) and the task's reward columns (`columns`: `solution`, or Countdown's
`nums`, `target`, `operations`); generated tasks add `completion` (a worked answer, for the warm start).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from . import rewards
from .countdown import CountdownSpec, canonical, generate, prompt_text, worked
from .data import _chat, load_math_dataset


class Task:
    """The interface every task has. Subclasses set `name`, `reward_names` and `columns`, and define `split`."""

    name: str = ""
    reward_names: tuple[str, ...] = ("accuracy_reward",)  # functions of forking_trl.rewards the task trains with
    columns: tuple[str, ...] = ("solution",)  # the reward's columns, beside `prompt`
    several_solutions: bool = False  # True: answers have an identity, and the coverage of solutions is measured

    def split(self, num_train: int, num_eval: int) -> tuple[list[dict], list[dict]]:
        """(train rows, held-out rows); no held-out problem is a training problem."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The task's own settings that decide its rows (recorded beside a start model built from them)."""
        return {}

    def reward_funcs(self) -> list[Callable]:
        return [getattr(rewards, name) for name in self.reward_names]

    def training_rows(self, rows: list[dict]) -> list[dict]:
        """The rows as a trainer takes them: `prompt` and the reward's columns."""
        return [{"prompt": r["prompt"], **{c: r[c] for c in self.columns}} for r in rows]

    def grade(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        """Correctness of each completion for its row (1.0 / 0.0; None: the row cannot be graded)."""
        return rewards.accuracy_reward(completions, [r["solution"] for r in rows])

    def answer_key(self, completion: str, row: dict) -> str | None:
        """The identity of a completion's answer (two completions give the same answer when their keys are equal);
        None when it gives none."""
        return rewards.extract_answer(completion)

    def num_solutions(self, row: dict) -> int | None:
        """How many distinct correct answers the problem has (None: unknown)."""
        return 1


def _prompt_key(row: dict) -> str:
    return json.dumps(row["prompt"])


def _held_out(pool, seen: set[str], num_eval: int) -> tuple[list[dict], int]:
    """The first `num_eval` rows of `pool` whose prompt is not in `seen` (one pass, stopping there), and how many
    rows were skipped on the way."""
    held, skipped = [], 0
    for row in pool:
        if _prompt_key(row) in seen:
            skipped += 1
            continue
        held.append(row)
        if len(held) == num_eval:
            break
    return held, skipped


def _enough(held: list[dict], num_eval: int, task: Task, num_train: int) -> list[dict]:
    """`held`, or a `ValueError` when the training problems leave none to hold out; a message when fewer than asked."""
    if not held:
        raise ValueError(
            f"no held-out problem is left: {num_train} training problems of {task} cover its problem space. Lower "
            "num_train, or widen the task's ranges."
        )
    if len(held) < num_eval:
        print(
            f"held-out set: {len(held)} problems, not the {num_eval} asked for (the training problems cover the rest)"
        )
    return held


# ------------------------------------------------------------------------------------------------------------------
# synthetic arithmetic: one valid path per problem


class _Drawn(Task):
    """A generated task with one valid path per problem (its `rows(n, seed)`, its `seed`): training rows drawn with
    `seed + 1` (problems repeat when the space is small), held-out ones with `seed + 2` and without the training
    prompts. `instruction`, when set, follows each question (`What is 7 + 12? Answer with just the number.`): a
    pretrained instruct model answers in its own words, and a sentence of format steers it without teaching it."""

    seed: int
    instruction: str

    def question(self, text: str) -> list[dict]:
        """The chat prompt of a question: the question, then the instruction when there is one."""
        return _chat(f"{text} {self.instruction}" if self.instruction else text)

    def rows(self, n: int, seed: int) -> list[dict]:
        raise NotImplementedError

    def split(self, num_train: int, num_eval: int) -> tuple[list[dict], list[dict]]:
        train = self.rows(num_train, self.seed + 1)
        held = _held_out(self.rows(20 * num_eval, self.seed + 2), {_prompt_key(r) for r in train}, num_eval)[0]
        return train, _enough(held, num_eval, self, num_train)


@dataclass
class Arithmetic(_Drawn):
    """`What is 7 + 12?` -> `7 + 12 = 19. The answer is \\boxed{19}.`: operands 0 to `max_operand` (the demo's)."""

    max_operand: int = 9
    seed: int = 0
    instruction: str = ""
    name = "arithmetic"

    def rows(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            op = rng.choice("+-")
            result = a + b if op == "+" else a - b
            out.append(
                {
                    "prompt": self.question(f"What is {a} {op} {b}?"),
                    "solution": str(result),
                    "completion": f"{a} {op} {b} = {result}. The answer is \\boxed{{{result}}}.",
                }
            )
        return out

    def settings(self) -> dict:
        return {"max_operand": self.max_operand, **({"instruction": self.instruction} if self.instruction else {})}


@dataclass
class Chain(_Drawn):
    """Chained +/- arithmetic with a worked chain: `What is 7 + 12 - 5?` -> `7 + 12 = 19. 19 - 5 = 14. The answer
    is \\boxed{14}.` Operands 0 to `max_operand`, `steps` operations.

    The ablation's task: a worked solution whose tokens are mostly determined by the prompt and the previous tokens
    (copied operands, fixed phrasing), with a few genuine decision points (each result), so that a small model
    trained on it shows the paper's entropy pattern: most tokens near 0 nats, a minority of forks. One valid path per
    problem: its forks are uncertain results, not choices between ways to solve it."""

    max_operand: int = 20
    steps: int = 2
    seed: int = 0
    instruction: str = ""
    name = "chain"

    def rows(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            value = rng.randint(0, self.max_operand)
            question, work = str(value), []
            for _ in range(self.steps):
                op, b = rng.choice("+-"), rng.randint(0, self.max_operand)
                result = value + b if op == "+" else value - b
                question += f" {op} {b}"
                work.append(f"{value} {op} {b} = {result}.")
                value = result
            out.append(
                {
                    "prompt": self.question(f"What is {question}?"),
                    "solution": str(value),
                    "completion": " ".join(work) + f" The answer is \\boxed{{{value}}}.",
                }
            )
        return out

    def settings(self) -> dict:
        optional = {"steps": self.steps} if self.steps != 2 else {}
        if self.instruction:
            optional["instruction"] = self.instruction
        return {"max_operand": self.max_operand, **optional}


# ------------------------------------------------------------------------------------------------------------------
# Countdown: several solutions per problem


@dataclass
class Countdown(Task):
    """Countdown problems of `spec` (`forking_trl.countdown.CountdownSpec`): `Make 56 from 3, 5, 7 with + - * (each
    number once).` Rows: `prompt`, `nums`, `target`, `operations` (TinyZero's columns, and the allowed operations),
    `solutions` (every one, from the exact solver) and `completion`: one solution drawn uniformly among all, worked
    step by step (`forking_trl.countdown.worked`), so that a warm-started model spreads its mass over the solutions.

    Reward `countdown_reward`. An answer's identity is its expression up to the commutativity of + and ×
    (`forking_trl.countdown.canonical`): `(3 + 5) * 7` and `7 * (5 + 3)` are one solution, `(1 + 2) + 3` and
    `1 + (2 + 3)` two (they combine a different pair first)."""

    spec: CountdownSpec = field(default_factory=CountdownSpec)
    seed: int = 0
    name = "countdown"
    reward_names = ("countdown_reward",)
    columns = ("nums", "target", "operations")
    several_solutions = True

    def rows(self, n: int, seed: int, exclude: set[tuple] = frozenset()) -> list[dict]:
        """`n` problems (those whose `(nums, target)` is in `exclude` skipped), each with one worked solution."""
        rng = random.Random(seed)
        out = []
        draws = 0
        while len(out) < n:
            batch = generate(self.spec, max(64, n - len(out)), seed=rng.randrange(2**31))
            draws += len(batch)
            for p in batch:
                if (tuple(p["nums"]), p["target"]) in exclude:
                    continue
                solution = rng.choice(p["solutions"])
                out.append(
                    {
                        "prompt": _chat(prompt_text(p["nums"], p["target"], self.spec.operations)),
                        "nums": p["nums"],
                        "target": p["target"],
                        "operations": self.spec.operations,
                        "solutions": p["solutions"],
                        "completion": worked(solution),
                    }
                )
                if len(out) == n:
                    break
            if not out and draws > 100 * max(n, 64):
                raise ValueError(f"no Countdown problem of {self.spec} is left once the held-out ones are excluded.")
        return out

    def split(self, num_train: int, num_eval: int) -> tuple[list[dict], list[dict]]:
        """The held-out problems first (`num_eval` distinct ones, seed `seed + 2`), then training problems drawn with
        `seed + 1` among all the others (problems repeat when the space is small): training never meets them."""
        held, seen = [], set()
        rng = random.Random(self.seed + 2)
        for _ in range(100):
            for row in self.rows(4 * num_eval, rng.randrange(2**31)):
                key = (tuple(row["nums"]), row["target"])
                if key not in seen:
                    seen.add(key)
                    held.append(row)
                if len(held) == num_eval:
                    break
            if len(held) == num_eval:
                break
        return self.rows(num_train, self.seed + 1, exclude=seen), _enough(held, num_eval, self, num_train)

    def settings(self) -> dict:
        return {f"countdown_{k}": v for k, v in vars(self.spec).items()}

    def grade(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        return rewards.countdown_reward(
            completions, [r["nums"] for r in rows], [r["target"] for r in rows], [r["operations"] for r in rows]
        )

    def answer_key(self, completion: str, row: dict) -> str | None:
        answer = rewards.countdown_answer(rewards.completion_text(completion))
        return None if answer is None else canonical(answer)

    def num_solutions(self, row: dict) -> int | None:
        return len(row["solutions"])


# ------------------------------------------------------------------------------------------------------------------
# math datasets


@dataclass
class MathDataset(Task):
    """A math dataset (`forking_trl.data.load_math_dataset`: a bundled name or a file), held out against
    `eval_dataset`; reward `accuracy_reward` (math-verify)."""

    dataset: str = "gsm8k_train"
    eval_dataset: str | None = None
    name = "math"

    def split(self, num_train: int, num_eval: int) -> tuple[list[dict], list[dict]]:
        """The first `num_train` rows of `dataset` (shuffled), and `num_eval` of `eval_dataset` without any problem
        that is in them; `ValueError` when none is left."""
        if self.eval_dataset is None:
            raise ValueError(f"task={self.dataset!r} needs eval_dataset (a bundled name or file held out from it).")
        train = list(load_math_dataset(self.dataset, limit=num_train))
        pool = load_math_dataset(self.eval_dataset)
        if num_eval < len(pool):
            pool = pool.shuffle(seed=1)  # the order `limit` would give
        held, dropped = _held_out(pool, {_prompt_key(r) for r in train}, num_eval)
        if not held:
            raise ValueError(
                f"no held-out problem is left: every problem of eval_dataset={self.eval_dataset!r} is in the training "
                f"set (task={self.dataset!r}, num_train={num_train}). Hold out another set, or lower num_train."
            )
        if dropped:
            print(
                f"held-out set: dropped {dropped} problem(s) of {self.eval_dataset!r} that are in the training set; "
                f"{len(held)} remain",
                flush=True,
            )
        return train, held

    def load(self, limit: int | None = None) -> list[dict]:
        """The rows of `dataset` itself, in order (a benchmark to evaluate on)."""
        data = load_math_dataset(self.dataset)
        return list(data.select(range(min(limit, len(data))))) if limit else list(data)


GENERATED = {"arithmetic": Arithmetic, "chain": Chain, "countdown": Countdown}


def get_task(name: str, **options) -> Task:
    """A task by name: `arithmetic`, `chain`, `countdown` (their fields as `options`; Countdown's as `spec=` or as
    `CountdownSpec`'s fields), or any other name is a math dataset (`MathDataset(name, **options)`)."""
    if name == "countdown" and "spec" not in options:
        spec_fields = {k: options.pop(k) for k in list(options) if k in CountdownSpec.__dataclass_fields__}
        return Countdown(spec=CountdownSpec(**spec_fields), **options)
    if name in GENERATED:
        return GENERATED[name](**options)
    return MathDataset(name, **options)


# ------------------------------------------------------------------------------------------------------------------
# answer-level measures: what k samples of a problem cover


def answer_diversity(keys: list[list[str | None]]) -> dict:
    """Per problem the answers of its n samples (their `answer_key`, None for no answer): the mean number of distinct
    answers, and the mean entropy (nats) of the answers' empirical distribution (no answer counted as one more
    answer), over problems. Token entropy can rise while these fall: the answers narrow."""
    if not keys:
        return {"distinct_answers": math.nan, "answer_entropy": math.nan, "num_problems": 0}
    distinct, entropy = [], []
    for group in keys:
        counts = Counter(group)
        distinct.append(len([k for k in counts if k is not None]))
        n = len(group)
        entropy.append(-sum(c / n * math.log(c / n) for c in counts.values()))
    return {
        "distinct_answers": sum(distinct) / len(distinct),
        "answer_entropy": sum(entropy) / len(entropy),
        "num_problems": len(keys),
    }


def correct_solution_counts(keys: list[str | None], graded: list[float | None]) -> list[int]:
    """How many of a problem's samples gave each distinct correct answer (by key)."""
    counts = Counter(k for k, g in zip(keys, graded, strict=True) if g and k is not None)
    return sorted(counts.values(), reverse=True)
