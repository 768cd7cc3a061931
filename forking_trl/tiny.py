"""A tiny Qwen3 model and byte-level BPE tokenizer built offline, for tests, the demo and benchmarks; and the torch
thread count such small models run best with on a CPU that may be busy.

Nothing is downloaded: the tokenizer is trained in about a second with the `tokenizers` library on a small
synthetic corpus, and the model is a randomly initialised `Qwen3ForCausalLM` of a few hundred thousand parameters.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
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


# ---------------------------------------------------------------------------------------------------------------
# a randomly initialised model at a real model's shape, for benchmarks and the GPU check (no download)

QWEN3_VOCAB = 151_936
# Qwen3's published configs (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B): the shape only, random weights
MODEL_SHAPES = {
    "tiny": dict(hidden_size=128, num_layers=4),  # the tiny Qwen3 of the CPU benchmarks
    "qwen3-0.6b": dict(
        hidden_size=1024, num_layers=28, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, vocab_size=QWEN3_VOCAB, max_position_embeddings=40960, rope_theta=1_000_000.0,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048, num_layers=28, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, vocab_size=QWEN3_VOCAB, max_position_embeddings=40960, rope_theta=1_000_000.0,
    ),
}  # fmt: skip


def build_shaped_model(path: str | Path, shape: str, *, dtype: str = "float32", seed: int = 0) -> Path:
    """Save a randomly initialised Qwen3 of `shape` (`MODEL_SHAPES`) with the tiny tokenizer to `path` (reused when
    there) and return it. `"tiny"` is `build_tiny_model`'s model at hidden 128, 4 layers.

    The real shapes keep Qwen3's vocabulary of 151,936 rows (embedding and head), so the logits, the entropy and
    the memory are at real size, while the tokenizer has 512 tokens: an id it does not know decodes to nothing (the
    Rust tokenizer skips it), so a completion's text is shorter than its ids, and since the end-of-text token is one
    of 151,936 a random model seldom samples it: completions run to their length limit, the costly case."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    if shape not in MODEL_SHAPES:
        raise ValueError(f"shape must be one of {', '.join(MODEL_SHAPES)}; got {shape!r}.")
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    settings = dict(MODEL_SHAPES[shape])
    if shape == "tiny":
        return build_tiny_model(path, seed=seed, **settings)
    tokenizer = build_tokenizer(seed=seed)
    torch.manual_seed(seed)
    hidden, layers = settings.pop("hidden_size"), settings.pop("num_layers")
    config = tiny_qwen3_config(
        settings.pop("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **settings,
    )
    with torch.device("cpu"):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# threads: a tiny model's ops are small, so torch's threads meet at a barrier after each one; a thread that another
# process has descheduled stalls them all (the short demo on 2 cores with both busy: 29.6 s with 2 threads, 19.9 s
# with 1; idle, 2 threads are faster). So: as many threads as there are idle cores when the work starts.


def idle_cores(window_s: float = 0.2, cpus: set[int] | None = None) -> float | None:
    """Idle CPU cores over `window_s` seconds (from /proc/stat): summed over `cpus` (default: the CPUs this process
    may run on, its affinity), each CPU's idle share of its own ticks; None where it cannot be read."""
    cpus = allowed_cpus() if cpus is None else cpus
    try:
        before = per_cpu_ticks(read_proc_stat())
        time.sleep(window_s)
        after = per_cpu_ticks(read_proc_stat())
    except (OSError, ValueError):
        return None
    idle, seen = 0.0, 0
    for cpu in cpus:
        if cpu in before and cpu in after and after[cpu][0] > before[cpu][0]:
            idle += (after[cpu][1] - before[cpu][1]) / (after[cpu][0] - before[cpu][0])
            seen += 1
    return idle if seen else None


def read_proc_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


def cpu_ticks(line: str) -> tuple[int, int]:
    """(all, idle) ticks of /proc/stat's first line, "cpu user nice system idle iowait irq softirq steal ...";
    idle counts iowait, and guest time is left out (already inside user and nice)."""
    name, *values = line.split()
    if name != "cpu" or len(values) < 4:
        raise ValueError(f"not the aggregate cpu line of /proc/stat: {line!r}")
    return _ticks(values)


def per_cpu_ticks(text: str) -> dict[int, tuple[int, int]]:
    """{cpu number: (all, idle) ticks} from /proc/stat's "cpuN ..." lines (counted as `cpu_ticks` counts)."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            out[int(name[3:])] = _ticks(rest.split())
    if not out:
        raise ValueError("no per-cpu line in /proc/stat")
    return out


def _ticks(values: list[str]) -> tuple[int, int]:
    ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0)


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity); every CPU where that cannot be read."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> float | None:
    """The CPU cores this process's cgroup quota allows (quota / period, the smallest over its cgroup and the ones
    above it; cgroup v2's cpu.max or v1's cpu.cfs_quota_us), or None when there is none or it cannot be read."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip("/")
        if hierarchy == "0" and controllers == "":  # v2: <root>/<path>/cpu.max, "max 100000" or "200000 100000"
            for directory in _ancestors(root, rel):
                limits.append(_quota(directory / "cpu.max", None))
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's mount, cfs quota and period
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    for directory in _ancestors(mount, rel):
                        limits.append(_quota(directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us"))
                    break
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _ancestors(mount: Path, rel: str) -> list[Path]:
    parts = [p for p in rel.split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota(quota_file: Path, period_file: Path | None) -> float | None:
    try:
        if period_file is None:
            quota, period = quota_file.read_text().split()[:2]
        else:
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may use, at least 1: its affinity, capped by its cgroup's CPU quota (whole cores)."""
    cores = len(allowed_cpus()) or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cores, int(quota)) if quota is not None else cores)


def omp_threads(value: str | None) -> int | None:
    """The thread count `OMP_NUM_THREADS` sets for the outer level: "4" or "4,2" (OpenMP's list for nested levels)
    gives 4; None when unset or not a positive count."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def pick_threads(window_s: float = 0.2) -> tuple[int, str]:
    """Torch threads for tiny-model work, and why: `OMP_NUM_THREADS` when set (its first level); else the idle cores
    now among those this process may run on (a core counts when at least 80% idle), at least 1 and at most the
    usable cores (affinity and cgroup quota); else (no /proc/stat) the usable cores."""
    env = omp_threads(os.environ.get("OMP_NUM_THREADS"))
    if env is not None:
        return env, "OMP_NUM_THREADS"
    usable = usable_cores()
    idle = idle_cores(window_s)
    if idle is None:
        return usable, f"{usable} usable cores"
    threads = min(usable, max(1, int(idle + 0.2)))
    return threads, f"{idle:.1f} of {len(allowed_cpus())} allowed cores idle, {usable} usable"


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch threads, then restore the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
