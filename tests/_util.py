"""Helpers shared by the trainer tests."""

import torch
from datasets import Dataset


def prompt_dataset(n: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(n)])


def length_reward(completions, **kwargs) -> list[float]:
    """A reward with spread, so advantages are non-zero: completion length mod 5."""
    return [float(len(c[0]["content"]) % 5) for c in completions]


def trainer_args(tmp_path, **overrides):
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
    return ForkingGRPOConfig(**kwargs)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]
