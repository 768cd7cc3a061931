"""Helpers shared by the trainer tests."""

import torch
from datasets import Dataset


def prompt_dataset(n: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(n)])


def length_reward(completions, **kwargs) -> list[float]:
    """A reward with spread, so advantages are non-zero: completion length mod 5."""
    return [float(len(c[0]["content"]) % 5) for c in completions]


def trainer_args(tmp_path, config_class=None, **overrides):
    """The suite's tiny settings as a `ForkingGRPOConfig` (or `config_class`, e.g. `DynamicSamplingGRPOConfig`)."""
    from forking_trl import ForkingGRPOConfig

    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return (config_class or ForkingGRPOConfig)(**kwargs)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def prompt_number(text: str) -> int:
    """The i of a `prompt_dataset` prompt ('What is i + (i+1)?'), found in a prompt or decoded prompt text."""
    import re

    return int(re.search(r"What is (\d+) \+", text).group(1))


def half_constant_reward(prompts, completions, **kwargs) -> list[float]:
    """Constant (1.0) for the even prompts of `prompt_dataset`: uninformative groups. For the odd ones, a reward
    that varies within the group (length plus a per-call counter, so two completions of a group always differ)."""
    rewards = []
    for k, (prompt, completion) in enumerate(zip(prompts, completions)):
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        rewards.append(1.0 if prompt_number(text) % 2 == 0 else float(k % 4) + 0.01 * len(completion[0]["content"]))
    return rewards


class AdvantageSpy:
    """Wraps `trainer.compute_loss`: records, for each micro-batch trained on, its prompts' numbers and advantages."""

    def __init__(self, trainer):
        self.trainer, self.inner, self.seen = trainer, trainer.compute_loss, []
        trainer.compute_loss = self

    def __call__(self, model, inputs, *args, **kwargs):
        texts = self.trainer.processing_class.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
        numbers = [prompt_number(t) for t in texts]
        self.seen.append((numbers, inputs["advantages"].detach().cpu().tolist()))
        return self.inner(model, inputs, *args, **kwargs)


def tiny_moe_model(path, kind: str) -> str:
    """A tiny random mixture-of-experts model (`"qwen3_moe"` or `"gpt_oss"`) with the suite's tokenizer, saved at
    `path`; router logits on, as the released configs of both (so TRL trains with the load-balancing loss)."""
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from forking_trl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, output_router_logits=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=32, num_experts=4, **common))
    elif kind == "gpt_oss":
        model = GptOssForCausalLM(GptOssConfig(num_local_experts=4, layer_types=["full_attention"] * 2, **common))
    else:
        raise ValueError(f"kind must be 'qwen3_moe' or 'gpt_oss'; got {kind!r}.")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def uneven_prompt_dataset(n: int = 16) -> Dataset:
    """Prompts of clearly different token lengths, so TRL left-pads them for generation."""
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?" + " Think." * (i % 4)}]} for i in range(n)]
    )
