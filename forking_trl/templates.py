"""How a prompt reaches a model: chat messages through the tokenizer's chat template, or, for a model without one (a
base checkpoint: Gemma 3 270M, Qwen3-*-Base elsewhere, most pretrained models), as plain text through a prompt
template. Every place that hands prompts to a model (the trainers' data, `forking-trl analyze` and `overlap`,
`examples/evaluate.py`, the runner) goes through here, so a model without a chat template works everywhere.

- `PLAIN_TEMPLATE`: the default plain template, `"Question: {prompt}\\nAnswer:"`, the format of few-shot math
  evaluation (lm-evaluation-harness's GSM8K), which base models continue with a worked answer.
- `prompt_text(tokenizer, prompt, template)`: the text a model is given for one prompt.
- `plain_prompt(messages, template)`: chat messages as plain text: the system and user contents, in order, joined
  by a blank line, put in the template's `{prompt}`. A conversation with an assistant turn (few-shot as chat) cannot
  be flattened without inventing a format, and is refused.
"""

from __future__ import annotations

PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"
_FLATTENED_ROLES = ("system", "user")


def check_template(template: str | None, name: str = "prompt_template") -> None:
    """`ValueError` naming the field unless `template` is None or a string with exactly one `{prompt}` and no other
    braces' field (literal braces are written `{{` and `}}`, as in `str.format`)."""
    if template is None:
        return
    if not isinstance(template, str):
        raise ValueError(f"{name} must be a string with one '{{prompt}}', or None; got {template!r}.")
    import string

    try:
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(
            f"{name} is not a valid template ({err}); write literal braces as '{{{{' and '}}}}'."
        ) from None
    if names != ["prompt"]:
        raise ValueError(
            f"{name} must contain '{{prompt}}' exactly once and no other field; got {template!r} (fields: {names}). "
            f"Example: {PLAIN_TEMPLATE!r}."
        )


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_conversational(prompt) -> bool:
    """A list of `{"role", "content"}` messages (TRL's conversational format), not plain text."""
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def plain_prompt(messages: list[dict], template: str = PLAIN_TEMPLATE) -> str:
    """Chat `messages` (system and user only) as the plain text of `template`."""
    check_template(template)
    roles = [m.get("role") for m in messages]
    if not messages or any(role not in _FLATTENED_ROLES for role in roles):
        raise ValueError(
            f"a prompt with roles {roles} cannot be written as a plain prompt (only system and user messages can); "
            "give the model a chat template (tokenizer.chat_template), or plain-text prompts."
        )
    text = "\n\n".join(str(m.get("content", "")).strip() for m in messages)
    return template.format(prompt=text)


def prompt_text(tokenizer, prompt, template: str | None = None) -> str:
    """The text the model is given for `prompt` (chat messages or text).

    Plain text is given as it is. Chat messages: with `template=None`, through the tokenizer's chat template (with
    the generation prompt) when it has one, else through `PLAIN_TEMPLATE`; with a `template`, through that plain
    template whatever the tokenizer has."""
    if not is_conversational(prompt):
        return prompt
    if not needs_plain_prompts(tokenizer, template):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return plain_prompt(prompt, template or PLAIN_TEMPLATE)


def needs_plain_prompts(tokenizer, template: str | None) -> bool:
    """Whether chat prompts must be written as plain text for this tokenizer: a template was chosen, or the
    tokenizer has no chat template."""
    return template is not None or not has_chat_template(tokenizer)


def plain_dataset(dataset, template: str = PLAIN_TEMPLATE):
    """A `datasets` dataset (map-style or iterable) whose conversational `prompt` column is written as plain text
    through `template`; other columns unchanged. TRL then tokenizes the text as it is (no chat template)."""
    check_template(template)

    def write(row):
        prompt = row["prompt"]
        return {"prompt": plain_prompt(prompt, template) if is_conversational(prompt) else prompt}

    return dataset.map(write)
