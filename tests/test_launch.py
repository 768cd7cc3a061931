"""Real multi-process runs under `accelerate launch`: DDP over gloo with 2 processes, and DeepSpeed ZeRO-3 on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"


def launch(tmp_path, accelerate_args, script_args, extra_env=None, script=SCRIPT):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1"}
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, str(script), *script_args]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return [json.loads(p.read_text()) for p in sorted(Path(tmp_path).glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["micro_batch", "batch"])
def test_two_processes_share_tau_with_an_all_padding_rank(tiny_model, tmp_path, scope):
    records = launch(
        tmp_path,
        [
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        ["--model", tiny_model, "--output_dir", str(tmp_path), "--empty_rank", "1", "--scope", scope],
        {"ACCELERATE_USE_CPU": "true"},  # torchrun-style launch of 2 CPU processes: gloo
    )
    assert len(records) == 2 and all(r["world_size"] == 2 for r in records)
    assert records[0]["thresholds"] and records[0]["thresholds"] == records[1]["thresholds"]
    # rank 1 contributed no valid tokens, so the global kept fraction is rank 0's, close to 0.2
    assert all(abs(k - 0.2) < 0.12 for k in records[0]["kept_fraction"])


@pytest.mark.slow
def test_deepspeed_zero3_step_on_cpu(tiny_model, tmp_path):
    pytest.importorskip("deepspeed")
    config = ROOT / "accelerate_configs" / "zero3.yaml"
    records = launch(
        tmp_path,
        ["--config_file", str(config), "--num_processes", "1", "--mixed_precision", "no"],
        ["--model", tiny_model, "--output_dir", str(tmp_path), "--max_steps", "1"],
        {"DS_ACCELERATOR": "cpu"},
    )
    assert records and records[0]["deepspeed"]
    assert records[0]["thresholds"] and all(abs(k - 0.2) < 0.12 for k in records[0]["kept_fraction"])
