"""Prompts for models without a chat template (base checkpoints): the plain template, everywhere a model is named."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from forking_trl.templates import PLAIN_TEMPLATE, check_template, plain_dataset, plain_prompt, prompt_text

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def test_plain_prompt_joins_system_and_user_in_the_template():
    assert plain_prompt(CHAT) == "Question: Be brief.\n\nWhat is 2 + 3?\nAnswer:"
    assert plain_prompt(CHAT[1:], "Q: {prompt}\nA: {{boxed}}") == "Q: What is 2 + 3?\nA: {boxed}"
    with pytest.raises(ValueError, match="roles \\['user', 'assistant'\\] cannot be written as a plain prompt"):
        plain_prompt([*CHAT[1:], {"role": "assistant", "content": "5"}])


@pytest.mark.parametrize(
    "template, message",
    [
        ("no field", "must contain '{prompt}' exactly once"),
        ("{prompt} and {prompt}", "exactly once"),
        ("{question}", "no other field"),
        ("{prompt", "not a valid template"),
        (3, "must be a string"),
    ],
)
def test_a_bad_template_is_refused_naming_the_field(template, message):
    with pytest.raises(ValueError, match="prompt_template") as err:
        check_template(template)
    assert message in str(err.value)


def test_prompt_text_uses_the_chat_template_where_there_is_one(tiny_model, tiny_base_model):
    chat, base = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_base_model)
    assert prompt_text(chat, CHAT[1:]).startswith("<|im_start|>user")
    assert prompt_text(base, CHAT[1:]) == PLAIN_TEMPLATE.format(prompt="What is 2 + 3?")
    assert prompt_text(chat, CHAT[1:], "{prompt} =") == "What is 2 + 3? ="  # chosen: used whatever the tokenizer has
    assert prompt_text(base, "already text") == "already text"


def test_plain_dataset_rewrites_chat_prompts_only():
    data = Dataset.from_list([{"prompt": CHAT[1:], "solution": "5"}])
    rows = list(plain_dataset(data))
    assert rows == [{"prompt": "Question: What is 2 + 3?\nAnswer:", "solution": "5"}]


@pytest.mark.slow
def test_analyze_runs_on_a_model_without_a_chat_template(tiny_base_model, tmp_path):
    # the bug: "Cannot use chat template functions because tokenizer.chat_template is not set"
    from forking_trl.cli import main

    argv = ["--dataset", "gsm8k", "--num-samples", "2", "--max-new-tokens", "4", "--backend", "transformers"]
    main(["analyze", "--model", tiny_base_model, *argv, "--output-dir", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["num_tokens"] > 0
    assert "Question: " in (tmp_path / "a" / "tokens.html").read_text()  # the prompt as the model was given it
    main(
        ["overlap", "--base", tiny_base_model, "--other", tiny_base_model, *argv, "--output-dir", str(tmp_path / "o")]
    )
    assert json.loads((tmp_path / "o" / "overlap.json").read_text())["overlap"] == 1.0
    with pytest.raises(SystemExit, match="--prompt-template must contain"):
        main(["analyze", "--model", tiny_base_model, *argv, "--output-dir", str(tmp_path), "--prompt-template", "x"])


@pytest.mark.slow
def test_evaluate_runs_on_a_model_without_a_chat_template(tiny_base_model, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["--model", tiny_base_model, "--benchmarks", "gsm8k", "--limit", "2", "--k", "1", "--max_new_tokens", "4"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "evaluate.py"), *argv, "--backend", "transformers", "--output", out],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())["results"]["gsm8k"]["problems"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("which", ["base", "chosen"])
def test_the_trainers_give_plain_prompts_to_a_model_without_a_chat_template(
    tiny_model, tiny_base_model, tmp_path, which
):
    from _util import changed, prompt_dataset, snapshot, trainer_args

    from forking_trl import ForkingGRPOTrainer

    seen = []

    def reward(prompts, completions, **kwargs):
        seen.extend(prompts)
        return [float(len(c) % 3) for c in completions]

    model, template = (tiny_base_model, None) if which == "base" else (tiny_model, "Problem: {prompt}\nSolution:")
    args = trainer_args(tmp_path, prompt_template=template, max_steps=1)
    data = prompt_dataset(8)
    trainer = ForkingGRPOTrainer(model, reward, args=args, train_dataset=data, eval_dataset={"held": data})
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    expected = (template or PLAIN_TEMPLATE).split("{prompt}")[0]
    assert seen and all(isinstance(p, str) and p.startswith(expected) for p in seen)
    assert next(iter(trainer.eval_dataset["held"]))["prompt"].startswith(expected)
