import threading
import time

import pytest

from forking_trl.rewards import accuracy_reward, extract_answer, format_reward, get_reward_funcs


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),  # boxed fraction vs decimal gold
        ("Thus \\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{(1,3]}", "(1,3]", 1.0),  # interval
        ("\\boxed{[1,3)}", "(1,3]", 0.0),  # wrong interval ends
        ("Natalia sold 72 clips.\n#### 72", "72", 1.0),
        ("Answer: 1,000", "1000", 1.0),
        ("we get 3, then 40 + 2 = 42", "42", 1.0),  # last expression
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{7}", "8", 0.0),
        ("no answer here", "8", 0.0),
    ],
)
def test_accuracy_on_real_looking_cases(completion, gold, expected):
    assert accuracy_reward([completion], [gold]) == [expected]


def test_chat_format_and_unparsable_gold():
    chat = [[{"role": "assistant", "content": "<think>2+2</think> The answer is \\boxed{4}."}]]
    assert accuracy_reward(chat, ["4"]) == [1.0]
    assert accuracy_reward(["\\boxed{4}", "\\boxed{4}"], ["", "(" * 40]) == [None, None]  # skipped, never 1.0


def test_hostile_completions_off_the_main_thread_are_bounded():
    hostile = [
        "\\boxed{10^{10^{10^{10}}}}",  # hangs math-verify forever in C code
        "\\boxed{" + "(" * 5000 + "}",  # 15 s in math-verify
        "\\boxed{9^{9^{9}}}",  # reaches a worker: killed at the deadline if it overruns
        "\\boxed{5}",
    ]
    out, errors = [], []

    def run():
        try:
            out.append(accuracy_reward(hostile, ["5", "5", "5", "5"]))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors
    assert out[0] == [0.0, 0.0, 0.0, 1.0]
    assert time.monotonic() - started < 60


def test_common_case_is_fast():
    accuracy_reward(["\\boxed{\\frac{1}{3}}"], ["\\frac{1}{3}"])  # warm the workers
    completions = [f"... so the total is \\boxed{{{i}}}." for i in range(64)]
    started = time.perf_counter()
    rewards = accuracy_reward(completions, [str(i) for i in range(64)])
    assert rewards == [1.0] * 64
    assert time.perf_counter() - started < 5  # generous bound for a noisy CI machine; measured ~1 ms


def test_extraction_order():
    assert extract_answer("first \\boxed{1} then \\boxed{2}") == "2"
    assert extract_answer("<think>\\boxed{1}</think> final: 3") == "3"
    assert extract_answer("#### 12") == "12"


def test_format_reward_knows_about_think():
    completions = [
        "reasoning</think> so \\boxed{3}",  # the template opened <think> in the prompt
        "<think>still thinking \\boxed{3}",  # thinking never closed
        "\\boxed{3}",
        "the answer is 3",
    ]
    assert format_reward(completions) == [1.0, 0.0, 1.0, 0.0]


def test_registry_names_and_dotted_paths():
    acc, fmt, overlong = get_reward_funcs(
        ["accuracy", "format", "overlong"], max_completion_length=100, overlong_cache=20
    )
    assert acc.__name__ == "accuracy_reward" and fmt.__name__ == "format_reward"
    assert overlong([[1] * 90]) == [-0.5]
    (dotted,) = get_reward_funcs(["forking_trl.rewards.format_reward"])
    assert dotted is fmt
    with pytest.raises(ValueError, match="unknown reward function 'acc'"):
        get_reward_funcs(["acc"])


# ---------------------------------------------------------------------------------------------------------------
# hardening (issue 10): each case below failed before its fix


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("\\boxed{1,2}", "12", 0.0),  # a list is not a number
        ("\\boxed{0,5}", "5", 0.0),
        ("the values are 1,2", "12", 0.0),  # the last number is 2, not 12
        ("\\boxed{1,234}", "1234", 1.0),  # thousands separators stay credited
        ("Answer: 12,345,678", "12345678", 1.0),
        ("so we get 1,234", "1234", 1.0),
    ],
)
def test_commas_are_thousands_separators_only(completion, gold, expected):
    assert accuracy_reward([completion], [gold]) == [expected]


def _within(seconds: float, fn):
    """Run fn in a thread; its result, or a failure if it did not finish in time (a hang guard, not a timing)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    return out[0]


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 150_000,  # ~1 MB of unclosed boxes: 45 s in accuracy_reward before (a rescan per box)
        ("\\boxed{" + "{" * 8) * 70_000,
        "\\boxed{x} " + "\\boxed{" + "a" * 1_000_000,
    ],
)
def test_extraction_is_linear_on_a_megabyte_of_unclosed_boxes(text):
    assert _within(15, lambda: format_reward([text])) == [1.0 if text.startswith("\\boxed{x}") else 0.0]
    expected = [1.0] if text.startswith("\\boxed{x}") else [0.0]
    assert _within(15, lambda: accuracy_reward([text], ["x"])) == expected


def test_last_boxed_pairs_braces_like_a_scan():
    from forking_trl.rewards import last_boxed

    assert last_boxed("a } \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"  # the last box is unclosed: the one before it
    assert last_boxed("{ \\boxed {x}") == "x"
    assert last_boxed("\\boxed{" + "a" * 2000 + "}") is None  # longer than 4 * MAX_ANSWER_CHARS: unclosed
    assert last_boxed("no box") is None


def test_missing_gold_is_skipped_not_matched_with_none():
    assert accuracy_reward(["\\boxed{None}", "\\boxed{nan}", "\\boxed{4}"], [None, float("nan"), "4"]) == [
        None,
        None,
        1.0,
    ]


def test_every_bundled_gold_is_credited_against_itself():
    from forking_trl.data import BUNDLED, load_math_dataset

    golds = [gold for name in BUNDLED for gold in load_math_dataset(name)["solution"]]
    assert len(golds) > 1500
    rewards = accuracy_reward([f"so \\boxed{{{g}}}" for g in golds], golds)
    refused = [g for g, r in zip(golds, rewards) if r != 1.0]
    assert not refused  # 8 golds such as 'x^5 - x^4 + x^3 - x^2 + x - 1' were refused by a power-tower guard


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 completions but 1 solutions"):
        accuracy_reward(["\\boxed{1}"] * 3, ["1"])


def test_fork_while_another_thread_grades_does_not_hang_the_child():
    import os

    from forking_trl import rewards

    accuracy_reward(["\\boxed{\\frac{1}{2}}"], ["0.5"])  # workers up
    slow = threading.Thread(target=accuracy_reward, args=(["\\boxed{10^{10^{10^{10}}}}"], ["5"]), daemon=True)
    slow.start()  # holds the verifier's lock until its item's deadline
    deadline = time.monotonic() + 10
    while not rewards.default_verifier()._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rewards.default_verifier()._lock.locked()
    parent_workers = [w.process.pid for w in rewards.default_verifier()._workers]
    pid = os.fork()
    if pid == 0:  # the child: grade something that needs math-verify, then report through the exit status
        try:
            ok = accuracy_reward(["\\boxed{\\frac{1}{2}}"], ["0.5"]) == [1.0]
        finally:
            os._exit(0 if ok else 3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the verifier's lock")
    assert os.waitstatus_to_exitcode(status) == 0
    slow.join(timeout=30)
    for worker_pid in parent_workers:  # the child's exit did not kill the parent's workers
        os.kill(worker_pid, 0)


def test_numpy_nan_gold_is_skipped_like_a_python_nan():
    import numpy as np

    completions = ["\\boxed{nan}", "\\boxed{4}", "\\boxed{4}"]
    golds = [np.float32("nan"), np.float64("nan"), np.float32(4.0)]
    assert accuracy_reward(completions, golds) == [None, None, 1.0]


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "So the answer is" + "\n" * n,
        lambda n: "Answer:" + "\n" * n,
        lambda n: "The final answer is:" + " \n" * n,
        lambda n: "answer" + "\n" * n + "is" + "\n" * n,
        lambda n: "#### " + "\n" * n,
        lambda n: "\\boxed{" + "\n" * n,
        lambda n: "\\boxed{" * n,
        lambda n: "answer " * n,
        lambda n: "1," * n,
    ],
)
def test_answer_extraction_grows_linearly_on_adversarial_inputs(make):
    """The extraction runs in the training process before any worker deadline: every path must be linear. Checked
    by growth: 8x the input must cost well under 64x (quadratic) the time. Each figure is the best of 5 in this
    process's CPU time, not wall time: on a busy machine a descheduled moment is not counted (wall time gave 12x for
    4x the input there, 2026-12-07)."""

    def cost(n: int) -> float:
        text = make(n)
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(10):
                extract_answer(text)
            best = min(best, time.process_time() - start)
        return best

    small, large = cost(2000), cost(16000)
    assert large / small < 24, f"8x the input took {large / small:.1f}x the time ({small:.4f} s -> {large:.4f} s)"
