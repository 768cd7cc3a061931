"""What every forking_trl trainer mixin shares: `TrainerExtension`, the base of `DynamicSamplingMixin` and
`BranchingMixin` (and so of `ForkingGRPOTrainer`): the promotion of `args` before TRL's `__init__`, a model by
name or `.gguf` file (`forking_trl.models`), generation that works on mixture-of-experts models, plain prompts for a
tokenizer without a chat template, and launch hygiene. It sits right before `GRPOTrainer` in every trainer's MRO and
overrides nothing of TRL's but `__init__` and `_generate_single_turn`."""

from __future__ import annotations

import contextlib
import time

import torch.distributed as dist
from trl import GRPOConfig

from .config import GRPOExtensionConfig, prepare_trainer_args
from .models import resolve_model
from .templates import PLAIN_TEMPLATE, is_conversational, needs_plain_prompts, plain_dataset


class TrainerExtension:
    """Base of forking_trl's `GRPOTrainer` mixins. `config_class` is what `args` is promoted to (the trainer's own
    config: a subclass sets it once); a plain `GRPOConfig` keeps every value it holds, and fields the trainer does
    not implement are refused (`prepare_trainer_args`)."""

    config_class = GRPOExtensionConfig

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        args = prepare_trainer_args(type(self), model, args)  # a default output_dir from the name as given
        model = resolve_model(model)  # a real model's name or a .gguf file: a plain cached checkpoint
        self._check_before_trl(args, kwargs)
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)
        self._write_plain_prompts()

    def _write_plain_prompts(self) -> None:
        """Chat prompts for a tokenizer without a chat template (or with `prompt_template` set) become plain text
        through the template (`forking_trl.templates`), before any is generated from: TRL would fail on them
        ("tokenizer.chat_template is not set") at the first generation."""
        template = self.args.prompt_template
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor holds one
        if not needs_plain_prompts(tokenizer, template):
            return
        template = template or PLAIN_TEMPLATE
        datasets = {"train_dataset": self.train_dataset, "eval_dataset": self.eval_dataset}
        for name, dataset in datasets.items():
            if isinstance(dataset, dict):
                setattr(self, name, {k: _plain_if_chat(d, template) for k, d in dataset.items()})
            elif dataset is not None:
                setattr(self, name, _plain_if_chat(dataset, template))

    def _check_before_trl(self, args: GRPOExtensionConfig, kwargs: dict) -> None:
        """Refuse, before TRL's `__init__`, what the promoted `args` cannot train with the trainer's keyword
        arguments (a mixin extends it and calls this)."""

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        with router_logits_off(self.model):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    def end_distributed(self, grace_s: float = 0.2) -> None:
        """End a launched run cleanly; call it last in a script (the trainer cannot train after it).

        Finishes Accelerate's trackers and destroys the process group (`accelerator.end_training()`, as PyTorch asks
        of every script), then, if a group existed, sleeps `grace_s` seconds with the GIL released. The sleep is for
        gloo (CPU runs): a gloo worker thread frees the tensors of the last collective (transformers' final
        `store_flos` all-gather, about 1 ms before the script ends) only after the caller has its result, and needs
        the GIL for that. If the interpreter is already finalizing, the thread is killed inside C++ and the rank
        aborts with "terminate called without an active exception" (pytorch/pytorch#190489); destroying the group
        does not stop its workers while something else still holds it (DeepSpeed keeps the world group as a default
        argument). Seen in ~1 of 30 two-process CPU runs under load without this; the sleep gives the worker its turn.
        """
        was_distributed = dist.is_available() and dist.is_initialized()
        self.accelerator.end_training()
        if was_distributed:
            time.sleep(grace_s)


@contextlib.contextmanager
def router_logits_off(model):
    """Inside the block, a mixture-of-experts model (Qwen3-MoE, GPT-OSS, Mixtral, ...) does not return its router
    logits. Generation never uses them, and transformers' load-balancing loss breaks generation from left-padded
    prompts when they are on: at each cached decoding step it pairs one position's router logits with the whole
    attention mask ("The size of tensor a (2) must match the size of tensor b (18)"). TRL's training forward asks for
    them itself (`output_router_logits=True` in its inputs), so the auxiliary loss is untouched. A dense model, or a
    wrapped one whose configs do not have the flag, passes through unchanged."""
    configs = []
    for config in _configs(model):
        if getattr(config, "output_router_logits", False):
            configs.append(config)
            config.output_router_logits = False
    try:
        yield
    finally:
        for config in configs:
            config.output_router_logits = True


def _configs(model) -> list:
    """The model's config and its text config (a multimodal model's language model), each once."""
    config = getattr(getattr(model, "module", model), "config", None)  # DDP / DeepSpeed engines wrap in .module
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _plain_if_chat(dataset, template: str):
    """`dataset` with its chat prompts as plain text (`plain_dataset`), or as it is when its prompts are text."""
    first = next(iter(dataset), None)
    if not isinstance(first, dict) or not is_conversational(first.get("prompt")):
        return dataset
    if not hasattr(dataset, "map"):
        raise ValueError(
            f"the tokenizer has no chat template (or prompt_template is set), and the {type(dataset).__name__} holds "
            "chat prompts that only a `datasets` dataset can rewrite: give plain-text prompts, or a datasets.Dataset."
        )
    return plain_dataset(dataset, template)
