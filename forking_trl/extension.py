"""What every forking_trl trainer mixin shares: `TrainerExtension`, the base of `DynamicSamplingMixin` and
`BranchingMixin` (and so of `ForkingGRPOTrainer`): the promotion of `args` before TRL's `__init__`, and launch
hygiene. It sits right before `GRPOTrainer` in every trainer's MRO and overrides nothing of TRL's but `__init__`."""

from __future__ import annotations

import time

import torch.distributed as dist
from trl import GRPOConfig

from .config import GRPOExtensionConfig, prepare_trainer_args


class TrainerExtension:
    """Base of forking_trl's `GRPOTrainer` mixins. `config_class` is what `args` is promoted to (the trainer's own
    config: a subclass sets it once); a plain `GRPOConfig` keeps every value it holds, and fields the trainer does
    not implement are refused (`prepare_trainer_args`)."""

    config_class = GRPOExtensionConfig

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos_args, **kwargs):
        args = prepare_trainer_args(type(self), model, args)
        self._check_before_trl(args, kwargs)
        super().__init__(model, reward_funcs, args, *pos_args, **kwargs)

    def _check_before_trl(self, args: GRPOExtensionConfig, kwargs: dict) -> None:
        """Refuse, before TRL's `__init__`, what the promoted `args` cannot train with the trainer's keyword
        arguments (a mixin extends it and calls this)."""

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
