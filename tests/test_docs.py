"""The manual: the site builds with `--strict`, and every Python block of the README and of the docs pages runs as
written, with only the tiny offline model and a small budget put in."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
HUB_MODEL = '"Qwen/Qwen3-0.6B-Base"'
# a budget for the tiny model on CPU; everything else in the block is run as the page has it
BUDGET = (
    "max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, report_to=[], "
    'save_strategy="no"'
)


def python_blocks() -> dict[str, list[str]]:
    """Each distinct Python block, with the pages it appears on (the quickstart is on three)."""
    blocks: dict[str, list[str]] = {}
    for page in PAGES:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            blocks.setdefault(block, []).append(str(page.relative_to(ROOT)))
    return blocks


BLOCKS = python_blocks()


def test_the_pages_have_the_blocks_this_test_adapts():
    pages = {page for where in BLOCKS.values() for page in where}
    assert "README.md" in pages and len(BLOCKS) >= 4
    # the quickstart, dynamic sampling alone and branching alone train a Hub model: the tiny one is put in
    assert sum(HUB_MODEL in block for block in BLOCKS) == 3
    assert all(block.count('output_dir="out"') >= 1 for block in BLOCKS if HUB_MODEL in block)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{where[0]}#{i}" for i, where in enumerate(BLOCKS.values())])
def test_python_block_runs(index, tiny_model, tmp_path):
    code = list(BLOCKS)[index]
    code = code.replace(HUB_MODEL, repr(tiny_model)).replace('output_dir="out"', f'output_dir="out", {BUDGET}')
    script = tmp_path / f"block{index}.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`, as `make docs`: a broken link, a missing page or a docstring the reference cannot
    render fails; the generated configuration reference lists every field of the configs."""
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = (site / "reference" / "config" / "index.html").read_text()
    from forking_trl import BranchingGRPOConfig, DynamicSamplingGRPOConfig, ForkingGRPOConfig

    for cls in (ForkingGRPOConfig, DynamicSamplingGRPOConfig, BranchingGRPOConfig):
        for name in cls.__dataclass_fields__:
            if name.startswith(cls.own_field_prefixes):
                assert f"<code>{name}</code>" in config, (cls.__name__, name)
    assert "forking_select" in (site / "reference" / "api" / "index.html").read_text()
    shutil.rmtree(site)
