"""Held-out accuracy of a causal LM: greedy, sampled avg@k, pass@k, and for a task with several solutions per problem
the coverage of its solutions and the diversity of its answers.

One implementation for `examples/evaluate.py`, the ablation (`forking_trl.ablation`) and the demo. Generation is
transformers `generate` (batched, left-padded); the grading is the task's (`forking_trl.tasks`; by default math
answers with `forking_trl.rewards.accuracy_reward`). pass@k is the unbiased estimator of Chen et al. 2021 (the Codex
paper) from n >= k samples per problem; coverage@k the same estimator applied to each distinct correct solution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

from .analysis import _prompt_texts, _strip_after_eos
from .tasks import Task, answer_diversity, correct_solution_counts

MATH = Task()  # the default grading: the gold `solution` of each row, by math-verify


@dataclass
class Evaluation:
    """Accuracy on a held-out set, and the sampled completions (for entropy patterns and overlap)."""

    greedy: float  # share of problems solved by the greedy completion
    sampled: float  # avg@k: mean reward over k samples per problem at `temperature`
    k: int
    num_problems: int
    samples: list[tuple[str, list[int]]] = field(default_factory=list, repr=False)  # (prompt text, completion ids)
    texts: list[str] = field(default_factory=list, repr=False)  # decoded sampled completions, aligned with samples

    def as_dict(self) -> dict:
        return {"greedy": self.greedy, "sampled": self.sampled, "k": self.k, "num_problems": self.num_problems}


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    num_return_sequences: int = 1,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    logits_processor=None,
    progress=None,
) -> list[list[list[int]]]:
    """Completion token ids (up to EOS), `num_return_sequences` per prompt: `[prompt][sample] -> ids`.

    `logits_processor`: e.g. a `LogitsProcessorList` with `ForkingTemperatureLogitsProcessor` (the paper's decoding
    experiment)."""
    texts = _prompt_texts(tokenizer, prompts)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[list[int]]] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            generated = model.generate(
                **enc,
                **({"do_sample": False} if greedy else sampling),
                max_new_tokens=max_new_tokens,
                num_return_sequences=1 if greedy else num_return_sequences,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=logits_processor,
            )  # (len(batch) * n, prompt + new)
            ids = generated[:, enc.input_ids.shape[1] :].tolist()
            n = 1 if greedy else num_return_sequences
            out.extend([_strip_after_eos(x, tokenizer) for x in ids[i * n : (i + 1) * n]] for i in range(len(batch)))
            if progress is not None:
                progress.update(len(batch))
    finally:
        tokenizer.padding_side = side
    return out


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    *,
    k: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    task: Task = MATH,
) -> Evaluation:
    """Greedy accuracy and sampled avg@k on `rows` (`prompt` and the task's columns), graded by `task`; keeps the
    first sample of each problem."""
    was_training = model.training
    model.eval()
    prompts = [r["prompt"] for r in rows]
    greedy_ids = generate(model, tokenizer, prompts, greedy=True, max_new_tokens=max_new_tokens, batch_size=batch_size)
    sampled_ids = generate(
        model,
        tokenizer,
        prompts,
        num_return_sequences=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=max(1, batch_size // k),
    )
    model.train(was_training)
    greedy_text = [tokenizer.decode(g[0], skip_special_tokens=True) for g in greedy_ids]
    greedy = _mean(task.grade(greedy_text, rows))
    sampled_text = [[tokenizer.decode(s, skip_special_tokens=True) for s in group] for group in sampled_ids]
    flat = [t for group in sampled_text for t in group]
    sampled = _mean(task.grade(flat, [r for r in rows for _ in range(k)]))
    prompt_texts = _prompt_texts(tokenizer, prompts)
    return Evaluation(
        greedy=greedy,
        sampled=sampled,
        k=k,
        num_problems=len(rows),
        samples=[(p, group[0]) for p, group in zip(prompt_texts, sampled_ids, strict=True)],
        texts=[group[0] for group in sampled_text],
    )


def _mean(rewards: list[float | None]) -> float:
    scored = [r for r in rewards if r is not None]
    return sum(scored) / len(scored) if scored else float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", Sec. 2.1): 1 - C(n - c, k) / C(n, k), the probability that k of the n samples drawn without
    replacement include a correct one. Computed as a product (no large binomials); needs 0 <= c <= n and 1 <= k <= n.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an int; got {value!r}.")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:  # every draw of k includes a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n (n itself included when it is not a power of two)."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def pass_at_k_curve(correct: list[int], n: int, ks: list[int] | None = None) -> dict[int, float]:
    """Mean pass@k over problems, each with `correct[i]` of `n` samples right; for each k of `ks` (default
    `pass_at_k_ks(n)`)."""
    ks = pass_at_k_ks(n) if ks is None else ks
    if not correct:
        return {k: float("nan") for k in ks}
    return {k: sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks}


def coverage_at_k(solution_counts: list[int], n: int, k: int) -> float:
    """Expected number of distinct correct solutions among k of n samples, without bias: a solution seen c times in
    the n samples is among k of them drawn without replacement with probability 1 − C(n − c, k) / C(n, k) (pass@k's
    estimator for that solution), and the expectation is the sum over the distinct solutions seen.

    `solution_counts`: how many of the n samples gave each distinct correct solution (their sum is at most n).
    coverage@1 is the mean accuracy; coverage@n is the number of distinct solutions found.
    """
    if sum(solution_counts) > n or any(c < 0 for c in solution_counts):
        raise ValueError(f"coverage_at_k: counts {solution_counts} must be >= 0 and sum to at most n={n}.")
    return sum(pass_at_k(n, c, k) for c in solution_counts if c > 0)


def score_samples(
    completions: list[list[str]],
    rows: list[dict],
    task: Task = MATH,
    ks: list[int] | None = None,
    graded: list[list[float | None]] | None = None,
) -> dict:
    """pass@k from `completions[i]`, the n samples of problem `rows[i]` (every sample graded once by `task`, or
    `graded[i]` when given), for k in `ks` (default 1, 2, 4, ..., n); problems the task cannot grade are left out. For a task with several solutions
    (`task.several_solutions`) also `coverage`: coverage@k (the expected number of distinct correct solutions among k
    samples, `coverage_at_k`, distinct by `task.answer_key`) beside the number of solutions the problems have, and
    `answers`: the diversity of all the answers given (`forking_trl.tasks.answer_diversity`).

    Returns `{"n", "num_problems", "pass_at_k": {k: mean}, "correct": [c per problem]}` (+ `coverage`, `answers`)."""
    sizes = {len(group) for group in completions}
    if len(sizes) > 1:
        raise ValueError(f"every problem needs the same number of samples; got {sorted(sizes)}.")
    n = sizes.pop() if sizes else 1
    ks = pass_at_k_ks(n) if ks is None else ks
    correct, found, solutions, keys = [], [], [], []
    if graded is None:
        graded = [task.grade(group, [row] * len(group)) for group, row in zip(completions, rows, strict=True)]
    for group, row, grades in zip(completions, rows, graded, strict=True):
        grades = [None if g is None or math.isnan(g) else g for g in grades]  # a NaN grade is unscored, not correct
        if all(g is None for g in grades):
            continue
        correct.append(sum(1 for g in grades if g))
        if task.several_solutions:
            group_keys = [task.answer_key(text, row) for text in group]
            keys.append(group_keys)
            found.append(correct_solution_counts(group_keys, grades))
            solutions.append(task.num_solutions(row))
    out = {
        "n": n,
        "num_problems": len(correct),
        "pass_at_k": {str(k): v for k, v in pass_at_k_curve(correct, n, ks).items()},
        "correct": correct,
    }
    if task.several_solutions:
        known = [s for s in solutions if s is not None]
        out["coverage"] = {
            "n": n,
            "num_problems": len(found),
            "coverage_at_k": {
                str(k): sum(coverage_at_k(c, n, k) for c in found) / len(found) if found else math.nan for k in ks
            },
            "solutions_per_problem": sum(known) / len(known) if known else None,
            "found": [len(c) for c in found],
            "solutions": solutions,
        }
        out["answers"] = answer_diversity(keys)
    return out


def sample_pass_at_k(
    model,
    tokenizer,
    rows: list[dict],
    *,
    n: int = 64,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    progress=None,
    task: Task = MATH,
) -> dict:
    """Sample `n` completions per problem at `temperature` and estimate pass@k for k = 1, 2, 4, ..., n (and, for a
    task with several solutions, coverage@k and the answers' diversity): `score_samples` of the samples."""
    if n < 1:
        raise ValueError(f"n (samples per problem) must be >= 1; got {n}.")
    was_training = model.training
    model.eval()
    ids = generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        num_return_sequences=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=max(1, batch_size // n),
        progress=progress,
    )
    model.train(was_training)
    texts = [[tokenizer.decode(x, skip_special_tokens=True) for x in group] for group in ids]
    return score_samples(texts, rows, task)
