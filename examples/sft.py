"""Supervised fine-tuning on worked solutions (GSM8K, MATH), to see what it does to a model's entropy pattern.

The paper's first finding (Beyond the 80/20 Rule, arXiv 2506.01939) is about models that reason coherently; a short
SFT on worked solutions is the cheapest way to move a small model toward that regime, and `forking-trl analyze`
before and after shows what it does to the pattern (docs/real/index.md). The loss is on the solution tokens only
(TRL's prompt-completion form); the prompt is the one `forking-trl analyze` and the GRPO scripts give.

Usage (any flag overrides the YAML):

    # CPU, SmolLM2-135M-Instruct (offline, from the package index), 32 steps on GSM8K's training solutions
    python examples/sft.py --config examples/recipes/smollm2_135m_sft_gsm8k_cpu.yaml --output_dir outputs/real/sft
    forking-trl analyze --model outputs/real/sft --dataset gsm8k --num-samples 128 --max-new-tokens 256 \
        --temperature 1.0 --backend transformers --output-dir outputs/real/sft_t1

    # one GPU, LoRA (the adapter is merged into the saved model)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/sft.py \
        --config examples/recipes/smollm2_135m_sft_gsm8k_cpu.yaml --use_cpu false --use_peft --lora_r 16
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from forking_trl.data import DEFAULT_INSTRUCTION, load_math_dataset
from forking_trl.models import resolve_model


@dataclass
class SFTScriptArguments:
    """Arguments of the script itself (the data); training arguments are TRL's `SFTConfig`'s."""

    dataset_name: str = field(
        default="gsm8k_train",
        metadata={
            "help": "A dataset with worked solutions: a bundled name (gsm8k_train), a .jsonl/.json/.parquet file or a "
            "Hub id, GSM8K's schema (question, answer with '#### gold') or MATH's (problem, solution with \\boxed{})."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub datasets)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a random subset of this size."})
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Appended to each problem once, as `forking-trl analyze` and the GRPO scripts do."},
    )


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    ################
    # Model
    ################
    # a folder, a Hub id, a real model's name (smollm2-135m-instruct, gemma-3-270m: offline from the package index)
    # or a .gguf file: the last two become a plain checkpoint, converted once and cached (forking_trl.models)
    model_args.model_name_or_path = str(resolve_model(model_args.model_name_or_path))
    training_args.model_init_kwargs = {
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "revision": model_args.model_revision,
    }
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"model {model_args.model_name_or_path!r} has no chat template; the worked solutions are chat turns. "
            "Use an instruct model (smollm2-135m-instruct) or give the tokenizer a template."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    ################
    # Dataset: prompt (user) + completion (assistant, the worked solution); loss on the completion only
    ################
    train_dataset = load_math_dataset(
        script_args.dataset_name,
        script_args.dataset_split,
        instruction=script_args.instruction,
        limit=script_args.max_train_samples,
        seed=training_args.seed,
        worked=True,
    ).remove_columns("solution")

    ################
    # Training
    ################
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    if model_args.use_peft:  # a plain checkpoint that every tool reads: the adapter merged into the weights
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(training_args.output_dir)
            tokenizer.save_pretrained(training_args.output_dir)
    else:
        trainer.save_model(training_args.output_dir)
    trainer.accelerator.wait_for_everyone()


def make_parser() -> TrlParser:
    return TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
