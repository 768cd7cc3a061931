"""A tiny Qwen3 model and byte-level BPE tokenizer built offline, for tests, the demo and benchmarks.

Nothing is downloaded: the tokenizer is trained in about a second with the `tokenizers` library on a small
synthetic corpus, and the model is a randomly initialised `Qwen3ForCausalLM` of a few hundred thousand parameters.
"""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def tokenizer_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Lines of arithmetic with worked answers and reasoning words, so BPE learns useful merges."""
    rng = random.Random(seed)
    words = "So Wait However Thus Suppose Since Let Then First Next Finally Therefore the answer is we get".split()
    lines = ["Please reason step by step, and put your final answer within \\boxed{}."]
    for _ in range(num_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        result = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(
            f"What is {a} {op} {b}? {rng.choice(words)} {a} {op} {b} = {result}. The answer is \\boxed{{{result}}}."
        )
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A `PreTrainedTokenizerFast` (byte-level BPE, Qwen-style chat template, `<|im_end|>` as EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, **overrides):
    from transformers import Qwen3Config

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_cache=True,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Save a tiny random Qwen3 model and its tokenizer to `path` (reused when already there) and return it."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    path = Path(path)
    if not overwrite and (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    torch.manual_seed(seed)
    config = tiny_qwen3_config(
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
