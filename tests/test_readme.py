"""Every Python block of README.md runs as written, with only the tiny offline model and a small budget put in."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_MODEL = '"Qwen/Qwen3-0.6B-Base"'
# a budget for the tiny model on CPU; everything else in the block is run as the README has it
BUDGET = (
    "max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, report_to=[], "
    'save_strategy="no"'
)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_blocks_this_test_adapts():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert sum(HUB_MODEL in block for block in blocks) == 3  # the quickstart, dynamic sampling and branching alone
    assert blocks[0].count('output_dir="out"') == 2  # both statements of the quickstart get the budget


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tiny_model, tmp_path):
    code = python_blocks()[index]
    code = code.replace(HUB_MODEL, repr(tiny_model)).replace('output_dir="out"', f'output_dir="out", {BUDGET}')
    script = tmp_path / f"block{index}.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
