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
