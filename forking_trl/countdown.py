"""Countdown, the standard small search task of RLVR (TinyZero; AReaL ships it): use each given number exactly once,
with the allowed operations and parentheses, to reach the target. A problem usually has several solutions, and the
decisions (which pair, which operation) are real forks.

Pure Python, no torch: a problem generator with its ranges as arguments (solvable problems only), an exact solver
that lists every solution (distinct up to the commutativity of + and ×), and a safe parser and evaluator for a
model's answer (a grammar of numbers, the four operations and parentheses; exact rational arithmetic; bounded in
size and nesting on any input; never `eval`). The reward with TRL's signature is
`forking_trl.rewards.countdown_reward`.

"Distinct" solutions: expression trees equal up to swapping the operands of + and ×. `(1 + 2) * 3` and
`3 * (2 + 1)` are one solution; `(1 + 2) + 3` and `1 + (2 + 3)` are two (they combine a different pair first: a
different path).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

OPERATIONS = ("+", "-", "*", "/")
MAX_NUMBERS = 5  # the solver enumerates every tree: 5 numbers are ~10^5 combinations, 6 would be ~10^7
MAX_EXPRESSION_CHARS = 200  # an answer longer than this is not credited (and never parsed)
MAX_DEPTH = 16  # parentheses nested deeper than this: not credited
MAX_DIGITS = 6  # a number with more digits is not one of the given numbers: not credited
# one token: a number, a LaTeX command (\times, \frac, \left, a spacing command), or one other character
_TOKEN = re.compile(r"(\d+)|(\\(?:[A-Za-z]+|[^A-Za-z])|\S)")
# the spellings models write for each operation and bracket (plain text, Unicode, LaTeX), to the grammar's tokens;
# a `{...}` group (LaTeX) and `[...]` are brackets like `(...)`, each closed by its own kind
_SYMBOLS = {
    "+": "+",
    **dict.fromkeys(("-", "\u2212", "\u2013", "\u2014"), "-"),  # hyphen-minus, minus sign, en and em dashes
    **dict.fromkeys(("*", "×", "\u00b7", "\u22c5", "\u2217", "\u2715", "\\times", "\\cdot", "\\ast"), "*"),
    **dict.fromkeys(("/", "÷", "\u2215", "\u2044", "\\div"), "/"),
    **dict.fromkeys(("(", "\\lparen"), "("),
    **dict.fromkeys((")", "\\rparen"), ")"),
    **dict.fromkeys(("[", "\\lbrack"), "["),
    **dict.fromkeys(("]", "\\rbrack"), "]"),
    **dict.fromkeys(("{", "\\{", "\\lbrace"), "{"),
    **dict.fromkeys(("}", "\\}", "\\rbrace"), "}"),
    **dict.fromkeys(("\\frac", "\\dfrac", "\\tfrac"), "frac"),  # \frac{a}{b}: a / b
}
_CLOSING = {"(": ")", "[": "]", "{": "}"}
# read and dropped: math delimiters, LaTeX's sizing prefixes (\left( is a bracket) and spacing commands
_IGNORED = frozenset(
    ("$", "~", "\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\,", "\\;", "\\:", "\\!", "\\ ")
    + ("\\quad", "\\qquad", "\\displaystyle", "\\(", "\\)", "\\[", "\\]")
)


# ------------------------------------------------------------------------------------------------------------------
# expressions: a tree of numbers and binary operations; its canonical form identifies a solution


@dataclass(frozen=True)
class Expr:
    """A number (`op` None, `value` the number) or a binary operation on `left` and `right`."""

    value: Fraction
    op: str | None = None
    left: Expr | None = None
    right: Expr | None = None
    canonical: str = field(default="", compare=False)

    def numbers(self) -> list[int]:
        if self.op is None:
            return [int(self.value)]
        return self.left.numbers() + self.right.numbers()

    def text(self) -> str:
        """The expression with every operation in parentheses (but the outermost)."""
        if self.op is None:
            return str(int(self.value))
        return f"{_wrap(self.left)} {self.op} {_wrap(self.right)}"


def _wrap(e: Expr) -> str:
    return e.text() if e.op is None else f"({e.text()})"


def number(n: int) -> Expr:
    return Expr(Fraction(n), canonical=str(n))


def combine(op: str, left: Expr, right: Expr) -> Expr | None:
    """`left op right`, or None for a division by zero."""
    if op == "+":
        value = left.value + right.value
    elif op == "-":
        value = left.value - right.value
    elif op == "*":
        value = left.value * right.value
    elif right.value == 0:
        return None
    else:
        value = left.value / right.value
    a, b = left.canonical, right.canonical
    if op in "+*" and b < a:  # commutative: one order of the operands
        a, b = b, a
    return Expr(value, op, left, right, f"({a}{op}{b})")


# ------------------------------------------------------------------------------------------------------------------
# the solver


def solutions(
    nums: list[int] | tuple[int, ...], target: int, operations: str | tuple[str, ...] = OPERATIONS
) -> list[str]:
    """Every solution of the problem, one expression text each, distinct up to the commutativity of + and ×, in a
    stable order (sorted by canonical form). Uses every number exactly once."""
    nums = tuple(sorted(nums))
    _check_problem(nums, operations)
    found = _solve(nums, tuple(sorted(set(operations))))
    return [text for canon, text in sorted(found.get(Fraction(target), {}).items())]


@lru_cache(maxsize=4096)
def _solve(nums: tuple[int, ...], operations: tuple[str, ...]) -> dict[Fraction, dict[str, str]]:
    """{value: {canonical form: text}} of every expression over exactly the multiset `nums`."""
    out: dict[Fraction, dict[str, str]] = {}
    for e in _trees(nums, operations):
        out.setdefault(e.value, {})[e.canonical] = e.text()
    return out


@lru_cache(maxsize=4096)
def _trees(nums: tuple[int, ...], operations: tuple[str, ...]) -> tuple[Expr, ...]:
    """Every expression tree over exactly the multiset `nums` (one per canonical form)."""
    if len(nums) == 1:
        return (number(nums[0]),)
    trees: dict[str, Expr] = {}
    for left_nums, right_nums in _splits(nums):
        for left in _trees(left_nums, operations):
            for right in _trees(right_nums, operations):
                for op in operations:
                    for a, b in ((left, right), (right, left)) if op in "-/" else ((left, right),):
                        e = combine(op, a, b)
                        if e is not None:
                            trees.setdefault(e.canonical, e)
    return tuple(trees.values())


def _splits(nums: tuple[int, ...]):
    """The ways to split the multiset into two non-empty parts, each unordered pair once."""
    n = len(nums)
    seen = set()
    for mask in range(1, 2**n - 1):
        left = tuple(nums[i] for i in range(n) if mask >> i & 1)
        right = tuple(nums[i] for i in range(n) if not mask >> i & 1)
        key = tuple(sorted((left, right)))
        if key not in seen:
            seen.add(key)
            yield left, right


def _check_problem(nums, operations) -> None:
    if not 2 <= len(nums) <= MAX_NUMBERS:
        raise ValueError(f"a Countdown problem needs 2 to {MAX_NUMBERS} numbers; got {len(nums)}.")
    bad = [op for op in operations if op not in OPERATIONS]
    if bad or not operations:
        raise ValueError(f"operations must be a non-empty subset of {', '.join(OPERATIONS)}; got {operations!r}.")


# ------------------------------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class CountdownSpec:
    """The ranges of generated problems: `num_count` numbers drawn from [low, high] (with repeats), targets in
    [target_low, target_high], the allowed operations, and problems with at least `min_solutions` solutions."""

    num_count: int = 3
    low: int = 1
    high: int = 9
    target_low: int = 1
    target_high: int = 99
    operations: str = "+-*"
    min_solutions: int = 1

    def __post_init__(self):
        _check_problem(tuple(range(self.num_count)), tuple(self.operations))
        if not 0 <= self.low <= self.high:
            raise ValueError(f"the numbers' range must have 0 <= low <= high; got [{self.low}, {self.high}].")
        if self.target_low > self.target_high:
            raise ValueError(f"the target range is empty: [{self.target_low}, {self.target_high}].")
        if self.min_solutions < 1:
            raise ValueError(f"min_solutions must be >= 1; got {self.min_solutions}.")


def generate(spec: CountdownSpec, count: int, seed: int = 0, max_tries: int = 200) -> list[dict]:
    """`count` solvable problems: `{"nums", "target", "solutions"}`. For each, numbers are drawn, and the target is
    drawn among the values in range that the numbers reach by at least `spec.min_solutions` distinct expressions (so
    every problem has that many solutions; targets reached by more expressions are not favoured). Deterministic in
    `seed`. `ValueError` if the ranges make that impossible."""
    rng = random.Random(seed)
    ops = tuple(sorted(set(spec.operations)))
    out = []
    tries = 0
    while len(out) < count:
        nums = tuple(sorted(rng.randint(spec.low, spec.high) for _ in range(spec.num_count)))
        reachable = _targets(nums, ops, spec.target_low, spec.target_high, spec.min_solutions)
        if not reachable:
            tries += 1
            if tries > max_tries:
                raise ValueError(f"no solvable problem found in {max_tries} draws for {spec}.")
            continue
        target = rng.choice(reachable)
        out.append({"nums": list(nums), "target": target, "solutions": solutions(nums, target, ops)})
    return out


@lru_cache(maxsize=65536)
def worked(solution: str) -> str:
    """A worked completion for a solution: each operation as a step, innermost first, then the answer boxed:
    `(3 + 5) * 7` -> `3 + 5 = 8. 8 * 7 = 56. The answer is \\boxed{(3 + 5) * 7}.` (a step's result is written as
    a fraction `a/b` when it is not whole)."""
    expr = parse(solution)
    steps: list[str] = []

    def walk(e: Expr) -> str:
        if e.op is None:
            return _number_text(e.value)
        left, right = walk(e.left), walk(e.right)
        steps.append(f"{left} {e.op} {right} = {_number_text(e.value)}.")
        return _number_text(e.value)

    walk(expr)
    return " ".join(steps) + f" The answer is \\boxed{{{expr.text()}}}."


def _number_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def prompt_text(nums, target: int, operations: str = "+-*/") -> str:
    """The task's question: `Make 56 from 3, 5, 7 with + - * (each number once).`"""
    return f"Make {target} from {', '.join(map(str, nums))} with {' '.join(operations)} (each number once)."


@lru_cache(maxsize=4096)
def _targets(nums: tuple[int, ...], ops: tuple[str, ...], low: int, high: int, min_solutions: int) -> tuple[int, ...]:
    """The whole targets in [low, high] that `nums` reach by at least `min_solutions` distinct expressions."""
    return tuple(
        sorted(
            int(v)
            for v, found in _solve(nums, ops).items()
            if v.denominator == 1 and low <= v <= high and len(found) >= min_solutions
        )
    )


# ------------------------------------------------------------------------------------------------------------------
# a model's answer: parsed by a grammar, evaluated exactly


class Rejected(ValueError):
    """The text is not an acceptable Countdown expression (and why)."""


def parse(text: str, max_chars: int = MAX_EXPRESSION_CHARS) -> Expr:
    """The expression of `text` (numbers, + − × ÷ and brackets), or `Rejected`.

    Reads the spellings models write: `×`, `·`, `\\times`, `\\cdot` for `*`; `÷`, `\\div`, `\\frac{a}{b}` for `/`;
    the minus sign `−` and dashes for `-`; `(...)`, `[...]`, `{...}`, `\\left(...\\right)` as brackets (each closed by
    its own kind); `$`, `~` and LaTeX spacing are skipped. Linear in the text, which is refused above `max_chars`
    before anything is read; nesting deeper than `MAX_DEPTH` and numbers longer than `MAX_DIGITS` digits are
    refused; a division by zero is refused. No unary minus: every number must be one of the given ones.
    """
    if len(text) > max_chars:
        raise Rejected(f"longer than {max_chars} characters")
    tokens = []
    for m in _TOKEN.finditer(text):
        digits, symbol = m.groups()
        if digits is not None:
            if len(digits) > MAX_DIGITS:
                raise Rejected("a number longer than any given one")
            tokens.append(digits)
        elif symbol in _SYMBOLS:
            tokens.append(_SYMBOLS[symbol])
        elif symbol not in _IGNORED:
            raise Rejected(f"unexpected {'character' if len(symbol) == 1 else 'command'} {symbol!r}")
    if not tokens:
        raise Rejected("empty")
    expr, rest = _expression(tokens, 0, 0)
    if rest != len(tokens):
        raise Rejected(f"unexpected {tokens[rest]!r}")
    return expr


def _expression(tokens, i, depth):  # sum := product (('+'|'-') product)*
    left, i = _product(tokens, i, depth)
    while i < len(tokens) and tokens[i] in ("+", "-"):
        op = tokens[i]
        right, i = _product(tokens, i + 1, depth)
        left = combine(op, left, right)
    return left, i


def _product(tokens, i, depth):  # product := atom (('*'|'/') atom)*
    left, i = _atom(tokens, i, depth)
    while i < len(tokens) and tokens[i] in ("*", "/"):
        op = tokens[i]
        right, i = _atom(tokens, i + 1, depth)
        left = combine(op, left, right)
        if left is None:
            raise Rejected("division by zero")
    return left, i


def _atom(tokens, i, depth):  # atom := number | open sum close | 'frac' atom atom
    if i >= len(tokens):
        raise Rejected("ends early")
    token = tokens[i]
    if token in _CLOSING:
        if depth >= MAX_DEPTH:
            raise Rejected(f"parentheses nested deeper than {MAX_DEPTH}")
        inner, i = _expression(tokens, i + 1, depth + 1)
        if i >= len(tokens) or tokens[i] != _CLOSING[token]:
            raise Rejected(f"unclosed {token!r}")
        return inner, i + 1
    if token == "frac":  # \frac{a}{b}: numerator and denominator are atoms (LaTeX's \frac12 reads as 12: refused)
        if depth >= MAX_DEPTH:
            raise Rejected(f"parentheses nested deeper than {MAX_DEPTH}")
        numerator, i = _atom(tokens, i + 1, depth + 1)
        denominator, i = _atom(tokens, i, depth + 1)
        quotient = combine("/", numerator, denominator)
        if quotient is None:
            raise Rejected("division by zero")
        return quotient, i
    if token.isdigit():
        return number(int(token)), i + 1
    raise Rejected(f"unexpected {token!r}")


def check(text: str, nums, target: int, operations: str = "+-*/") -> tuple[bool, str]:
    """(correct, why): `text` uses each of `nums` exactly once, only `operations`, and equals `target` exactly."""
    try:
        expr = parse(text)
    except Rejected as err:
        return False, str(err)
    used = sorted(expr.numbers())
    if used != sorted(int(n) for n in nums):
        return False, f"uses {used}, not each of {sorted(nums)} exactly once"
    ops = _operations(expr)
    if not ops <= set(operations):
        return False, f"uses {''.join(sorted(ops - set(operations)))}, not allowed"
    if expr.value != target:
        return False, f"equals {expr.value}, not {target}"
    return True, "correct"


def canonical(text: str) -> str | None:
    """The canonical form of an expression (its solution's identity), or None when it does not parse."""
    try:
        return parse(text).canonical
    except Rejected:
        return None


def _operations(e: Expr) -> set[str]:
    return set() if e.op is None else {e.op} | _operations(e.left) | _operations(e.right)
