"""Shared fixtures: a tiny Qwen3 model and tokenizer built offline, once per session."""

import json
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


@pytest.fixture(scope="session")
def tiny_base_model(tiny_model, tmp_path_factory):
    """The tiny model saved as a base checkpoint: its tokenizer has no chat template (as Gemma 3 270M base)."""
    import shutil
    from pathlib import Path

    path = tmp_path_factory.mktemp("tiny_base") / "model"
    shutil.copytree(tiny_model, path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (path / name).unlink(missing_ok=True)
    config = path / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    return str(Path(path))
