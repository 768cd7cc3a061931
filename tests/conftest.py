"""Shared fixtures: a tiny Qwen3 model and tokenizer built offline, once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

_THREADS: tuple[int, str] | None = None


def pytest_configure(config):
    """Torch threads for the suite's tiny models: OMP_NUM_THREADS when set, else the idle cores at the start (fewer
    on a busy machine, where a descheduled thread stalls the others at every small op). The scripts it launches
    choose their own (`accelerate launch` gives each of several processes one thread)."""
    global _THREADS
    import torch

    from forking_trl.tiny import pick_threads

    _THREADS = pick_threads()
    torch.set_num_threads(_THREADS[0])


def pytest_report_header(config):
    return f"torch threads: {_THREADS[0]} ({_THREADS[1]})" if _THREADS else None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a saved tiny random Qwen3 (2 layers, hidden 64, 512-token byte-level BPE, chat template)."""
    from forking_trl.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))
