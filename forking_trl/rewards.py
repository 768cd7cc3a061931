"""Verifiable math rewards with TRL's signature `f(completions, **columns) -> list[float | None]`.

- `accuracy_reward`: 1.0 when the final answer equals the gold `solution` (math-verify, `verify(gold, answer)`),
  0.0 when not, `None` when the gold is missing or cannot be parsed (TRL then skips the sample). Bounded time:
  answers are extracted in one linear pass and checked cheaply in-process when they are plain numbers; anything
  else goes to worker processes with a deadline, and a worker that overruns (math-verify can hang in C code holding
  the GIL, where its `signal.alarm` timeouts cannot fire, and those are off outside the main thread anyway) is
  killed and replaced. Never raises on what a completion holds; safe to use after `os.fork()` (the child starts
  its own workers).
- `format_reward`: 1.0 when the answer part of the completion (after `</think>`, if thinking was opened) holds a
  `\\boxed{...}`.
- `soft_overlong_punishment`: DAPO's soft overlong punishment, TRL's `get_soft_overlong_punishment`.
- `get_reward_funcs(names)`: the registry behind `reward_funcs: [accuracy, format, overlong]` in YAML recipes, with
  a dotted-path fallback (`my_pkg.rewards.my_reward` or `my_pkg.rewards:my_reward`).
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import math
import numbers
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from fractions import Fraction

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------------
# answer extraction: cheap, bounded, in-process

# Guards for what the workers' deadline cannot bound: the in-process work and the size of what is sent. Expensive
# but short answers (power towers such as 10^{10^{10^{10}}}) are left to the deadline, so that legitimate answers
# with many powers (x^5 - x^4 + x^3 - x^2 + x - 1) are still credited.
MAX_ANSWER_CHARS = 256  # a final answer longer than this is not credited (and never parsed)
MAX_NESTING = 16  # brackets nested deeper than this: not credited, never parsed (no real answer nests so deep)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_HASHES = re.compile(r"####\s*([^\n]+)")
# `(?:\s*:)?\s*`, not `\s*:?\s*`: two whitespace runs around an optional colon split a long run of newlines in
# quadratically many ways before `[^\n]+` fails; this form tries each split once (linear)
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)(?:\s*:)?\s*([^\n]+)", re.IGNORECASE)
# a number: commas only as thousands separators (1,234), so a list such as 1,2 is never read as 12
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(rf"-?(?:{_DIGITS})(?:/\d+)?")
_PLAIN_NUMBER = re.compile(rf"^\s*-?(?:{_DIGITS})(?:\s*/\s*\d+)?\s*$")


def completion_text(completion) -> str:
    """The text of a completion given as a string or as chat messages (the last assistant content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        last = completion[-1]
        if isinstance(last, dict):
            content = last.get("content", "")
            if isinstance(content, list):  # multimodal content blocks
                return " ".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
            return str(content)
    return str(completion) if completion is not None else ""


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None.

    Linear in the text: one pass pairs every brace, then the boxes are tried from the last. A box whose content is
    longer than `4 * MAX_ANSWER_CHARS` counts as unclosed.
    """
    opens = [match.end() - 1 for match in _BOXED.finditer(text)]  # index of each box's "{"
    if not opens:
        return None
    closing: dict[int, int] = {}  # "{" index -> index of its matching "}"
    stack: list[int] = []
    for brace in _BRACE.finditer(text):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            closing[stack.pop()] = brace.start()
    for start in reversed(opens):
        end = closing.get(start)
        if end is not None and end - start - 1 <= 4 * MAX_ANSWER_CHARS:
            return text[start + 1 : end]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer: the last `\\boxed{}`, else `#### N`, else `Answer: ...`, else the last number."""
    text = answer_part(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    stated = _ANSWER_IS.findall(text)
    if stated:
        return stated[-1].strip().rstrip(".").strip("$ ")
    numbers = _NUMBER.findall(text[-2000:])
    return numbers[-1] if numbers else None


def answer_part(text: str) -> str:
    """The text after the reasoning: after the last `</think>` when there is one."""
    end = text.rfind("</think>")
    return text[end + len("</think>") :] if end >= 0 else text


def _too_hostile(answer: str) -> bool:
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    depth = deepest = 0
    for ch in answer:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest > MAX_NESTING


def _missing(gold) -> bool:
    """No gold: None, or a NaN of any real type (Python's float, NumPy's float32/float64, ...)."""
    if gold is None:
        return True
    if isinstance(gold, numbers.Real) and not isinstance(gold, (bool, int)):
        return math.isnan(float(gold))
    return False


def _as_number(s: str) -> Fraction | None:
    """A plain number (`72`, `-3.5`, `1,000`, `3/4`) as an exact fraction, or None."""
    s = s.strip().strip("$").strip()
    if not _PLAIN_NUMBER.match(s):
        return None
    s = s.replace(",", "").replace(" ", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


# ------------------------------------------------------------------------------------------------------------------
# math-verify in worker processes with a deadline


def verify_pair(gold: str, answer: str) -> float | None:
    """math-verify on one pair, in the calling process: 1.0, 0.0, or None when the gold does not parse."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", configs, parsing_timeout=3) or parse(gold, parsing_timeout=3)
    if not gold_parsed:
        return None
    answer_parsed = parse(f"${answer}$", configs, parsing_timeout=3)
    if not answer_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, answer_parsed, timeout_seconds=3) else 0.0


class _Worker:
    """`python -m forking_trl._verify_worker`: JSON lines in, JSON lines out; independent of the caller's __main__."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forking_trl._verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.ready = False
        self.task: int | None = None
        self.started = time.monotonic()

    def send(self, task: int, pair: tuple[str, str]) -> None:
        self.task, self.started = task, time.monotonic()
        self.process.stdin.write(json.dumps(pair) + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathVerifier:
    """A small pool of math-verify worker processes; `check` settles each item within `timeout` seconds.

    Thread-safe. Workers start on first use and stay up; one that overruns its deadline is killed and replaced, and
    its item scores 0.0. If workers cannot start at all, items score 0.0 and a warning is logged (never raises).
    """

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, start_timeout: float = 60.0):
        self.num_workers, self.timeout, self.start_timeout = num_workers, timeout, start_timeout
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.num_killed = 0
        _VERIFIERS.add(self)

    def _forget_after_fork(self) -> None:
        """In a forked child: a fresh lock (another thread may have held it at the fork) and no workers (they
        belong to the parent: the child must neither talk to them nor kill them at exit)."""
        self._lock = threading.Lock()
        self._workers = []

    def check(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """`(gold, answer)` pairs to rewards: 1.0, 0.0, or None where the gold does not parse."""
        if not pairs:
            return []
        with self._lock:
            try:
                return self._run(pairs)
            except Exception as err:  # noqa: BLE001  (a reward never raises)
                logger.warning("forking_trl: math-verify workers failed (%s); scoring %d items 0.0", err, len(pairs))
                self.close()
                return [0.0] * len(pairs)

    def _run(self, pairs):
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker())
        results: list[float | None] = [0.0] * len(pairs)
        todo = list(range(len(pairs)))[::-1]
        restarts = 0
        while todo or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and todo:
                    i = todo.pop()
                    w.send(i, pairs[i])
            now = time.monotonic()
            deadlines = [w.started + (self.timeout if w.ready else self.start_timeout) for w in self._workers]
            readable, _, _ = select.select(
                [w.process.stdout for w in self._workers], [], [], max(0.0, min(deadlines) - now)
            )
            for stream in readable:
                w = next(w for w in self._workers if w.process.stdout is stream)
                line = stream.readline()
                if not line:  # the worker died; its item (if any) scores 0.0
                    restarts += 1
                    self._replace(w)
                    continue
                message = json.loads(line)
                if message == "ready":
                    w.ready = True
                elif w.task is not None:
                    results[w.task], w.task = message, None
            now = time.monotonic()
            for w in list(self._workers):
                limit = self.timeout if w.ready else self.start_timeout
                if (w.task is not None or not w.ready) and now - w.started > limit:
                    self.num_killed += 1
                    restarts += 1
                    self._replace(w)  # an overrunning item keeps its 0.0
            if restarts > 4 * self.num_workers + len(pairs):
                raise RuntimeError("workers keep dying")
        return results

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.kill()
            except Exception:  # noqa: BLE001
                pass
        self._workers = []


_VERIFIER: MathVerifier | None = None
_VERIFIERS: weakref.WeakSet[MathVerifier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for verifier in list(_VERIFIERS):
        verifier._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def default_verifier() -> MathVerifier:
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = MathVerifier()
        atexit.register(_VERIFIER.close)
    return _VERIFIER


# ------------------------------------------------------------------------------------------------------------------
# rewards


def accuracy_reward(completions: list, solution: list[str], **kwargs) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold `solution`, 0.0 if not, None if the gold is unparsable.

    The final answer is the last `\\boxed{...}`, else `#### N`, else `Answer: ...`, else the last number. Plain
    numbers are compared exactly in-process; anything else is checked by math-verify in worker processes, each
    item within 5 seconds (overrunning items score 0.0). A missing gold (`None`, NaN) gives `None`. Never raises on
    what a completion or gold holds; a `ValueError` when the number of solutions differs from the completions'.
    """
    if len(completions) != len(solution):
        raise ValueError(
            f"accuracy_reward got {len(completions)} completions but {len(solution)} solutions; TRL passes one "
            "`solution` per completion: check that the dataset has a `solution` column."
        )
    rewards: list[float | None] = [0.0] * len(completions)
    to_verify: list[tuple[int, str, str]] = []
    for i, (completion, gold) in enumerate(zip(completions, solution)):
        try:
            if _missing(gold):  # no gold: TRL skips the sample (never compare with the string 'None')
                rewards[i] = None
                continue
            gold = str(gold).strip()
            gold = last_boxed(gold) or gold  # golds given as a worked solution with a box
            answer = extract_answer(completion_text(completion))
            if not gold or _too_hostile(gold):
                rewards[i] = None
                continue
            if answer is None or _too_hostile(answer):
                continue
            gold_number, answer_number = _as_number(gold), _as_number(answer)
            if gold_number is not None and answer_number is not None:
                rewards[i] = 1.0 if gold_number == answer_number else 0.0
            elif answer.strip() == gold:
                rewards[i] = 1.0
            else:
                to_verify.append((i, gold, answer))
        except Exception:  # noqa: BLE001  (a reward never raises)
            rewards[i] = 0.0
    if to_verify:
        checked = default_verifier().check([(gold, answer) for _, gold, answer in to_verify])
        for (i, _, _), value in zip(to_verify, checked):
            rewards[i] = value
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 if the answer part (after `</think>`; the template may have opened `<think>` in the prompt) has a box."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        unfinished_thinking = "<think>" in text and "</think>" not in text
        rewards.append(0.0 if unfinished_thinking or last_boxed(answer_part(text)) is None else 1.0)
    return rewards


def soft_overlong_punishment(max_completion_length: int, soft_punish_cache: int) -> Callable:
    """DAPO's soft overlong punishment (Eq. 13 of arXiv 2503.14476): TRL's implementation."""
    from trl.rewards import get_soft_overlong_punishment

    return get_soft_overlong_punishment(max_completion_length, soft_punish_cache)


def countdown_answer(text: str) -> str | None:
    """The equation a Countdown completion answers with: the last `<answer>...</answer>` (TinyZero's format), else
    the last `\\boxed{...}`; its left side when it is written `expression = target`. Linear in the text."""
    text = answer_part(text)
    end = text.rfind("</answer>")
    if end >= 0:
        start = text.rfind("<answer>", 0, end)
        answer = text[start + len("<answer>") : end] if start >= 0 else None
    else:
        answer = last_boxed(text)
    if answer is None:
        return None
    return answer.split("=", 1)[0].strip()


def countdown_reward(
    completions: list, nums: list, target: list, operations: list | None = None, **kwargs
) -> list[float | None]:
    """Countdown (TinyZero's rules): 1.0 if the completion's equation (`countdown_answer`) uses every number of
    `nums` exactly once, only + − × ÷ and brackets, and equals `target` exactly in rational arithmetic (7/2*4
    reaches 14; no float tolerance); 0.0 otherwise, a division by zero included; None when the problem is missing.
    The operations may be spelled as models write them: `*`, `×`, `·`, `\\times`, `\\cdot`; `/`, `÷`, `\\div`,
    `\\frac{a}{b}`; `-`, `−` (U+2212) or a dash; brackets `()`, `[]`, `{}`, `\\left( \\right)`; `$` and LaTeX spacing
    are skipped (`forking_trl.countdown.parse`).

    The columns `nums` and `target` are TinyZero's Countdown data's, so such a dataset trains as it is. An optional
    column `operations` (a string such as `"+-*"` per row; `forking_trl.tasks.Countdown` writes it) restricts the
    operations a row allows; without it all four are allowed, as in TinyZero. The answer is
    parsed by a grammar (`forking_trl.countdown.parse`, never `eval`), refused above 200 characters or 16 nested
    parentheses: bounded on any input. Never raises on what a completion holds."""
    from .countdown import check

    if not (len(completions) == len(nums) == len(target)):
        raise ValueError(
            f"countdown_reward got {len(completions)} completions, {len(nums)} nums and {len(target)} targets; TRL "
            "passes one of each per completion: check that the dataset has `nums` and `target` columns."
        )
    if operations is None:
        operations = ["+-*/"] * len(completions)
    elif len(operations) != len(completions):
        raise ValueError(f"countdown_reward got {len(completions)} completions and {len(operations)} operations.")
    rewards: list[float | None] = []
    for completion, given, goal, ops in zip(completions, nums, target, operations, strict=True):
        if given is None or _missing(goal):
            rewards.append(None)
            continue
        try:
            answer = countdown_answer(completion_text(completion))
            rewards.append(1.0 if answer is not None and check(answer, given, int(goal), ops or "+-*/")[0] else 0.0)
        except Exception:  # noqa: BLE001  (a reward never raises)
            rewards.append(0.0)
    return rewards


REWARDS: dict[str, Callable] = {"accuracy": accuracy_reward, "format": format_reward, "countdown": countdown_reward}
FACTORIES: dict[str, Callable] = {"overlong": soft_overlong_punishment}


def get_reward_funcs(
    names: Sequence[str], *, max_completion_length: int | None = None, overlong_cache: int | None = None
) -> list[Callable]:
    """Reward functions by name (`accuracy`, `format`, `overlong`) or dotted path (`pkg.module.func`)."""
    funcs = []
    for name in names:
        if name in REWARDS:
            funcs.append(REWARDS[name])
        elif name == "overlong":
            if not max_completion_length or overlong_cache is None:
                raise ValueError(
                    "reward 'overlong' needs max_completion_length and overlong_cache (the soft punishment zone)."
                )
            funcs.append(soft_overlong_punishment(max_completion_length, overlong_cache))
        elif "." in name or ":" in name:
            module, _, attr = name.replace(":", ".").rpartition(".")
            try:
                funcs.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError) as err:
                raise ValueError(f"reward function {name!r} could not be imported: {err}") from err
        else:
            known = ", ".join(sorted([*REWARDS, *FACTORIES]))
            raise ValueError(f"unknown reward function {name!r}; use one of {known}, or a dotted path.")
    return funcs
