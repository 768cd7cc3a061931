"""Real multi-process runs under `accelerate launch`: DDP over gloo with 2 processes (DeepSpeed ZeRO-3 on CPU: in
test_branching.py and the GPU check's smoke test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"
EXIT_PROBE = ROOT / "tests" / "scripts" / "exit_probe"  # a sitecustomize: each rank records its state at exit


def launch(tmp_path, accelerate_args, script_args, extra_env=None, script=SCRIPT):
    """Run `script` under `accelerate launch`; return the `rank*.json` records it wrote.

    Also checks that every rank destroyed its process group before exiting: one left alive is torn down during
    interpreter finalization, where gloo can abort the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#190489). That failed CI once in ~30 runs; the probe makes it deterministic.
    """
    paths = os.pathsep.join(map(str, [EXIT_PROBE, ROOT / "tests", ROOT]))
    env = {**os.environ, "PYTHONPATH": paths, "HF_HUB_OFFLINE": "1", "FORKING_EXIT_PROBE_DIR": str(tmp_path)}
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, str(script), *script_args]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    exits = [json.loads(p.read_text()) for p in sorted(Path(tmp_path).glob("exit_rank*.json"))]
    assert exits and all(not e["process_group_alive"] for e in exits), exits
    return [json.loads(p.read_text()) for p in sorted(Path(tmp_path).glob("rank*.json"))]


@pytest.mark.slow
def test_grpo_math_on_two_processes_releases_the_process_group(tiny_model, tmp_path):
    # the user-facing script under a real 2-process launch (launch() checks that both ranks released the group)
    launch(
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        + ["--dynamo_backend", "no"],
        ["--config", str(ROOT / "examples/recipes/tiny_cpu.yaml"), "--model_name_or_path", tiny_model]
        + ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_train_samples", "16"],
        {"ACCELERATE_USE_CPU": "true"},
        script=ROOT / "examples" / "grpo_math.py",
    )
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("exit_rank*.json")) == ["exit_rank0.json", "exit_rank1.json"]


@pytest.mark.slow
def test_two_processes_share_tau_with_an_all_padding_rank(tiny_model, tmp_path):
    """Both forking scopes in turn, in one launch of 2 CPU processes (torchrun-style: gloo)."""
    launch(
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        + ["--dynamo_backend", "no"],
        ["--model", tiny_model, "--output_dir", str(tmp_path), "--empty_rank", "1", "--scope", "micro_batch", "batch"],
        {"ACCELERATE_USE_CPU": "true"},
    )
    for scope in ("micro_batch", "batch"):
        records = [json.loads(p.read_text()) for p in sorted((tmp_path / scope).glob("rank*.json"))]
        assert len(records) == 2 and all(r["world_size"] == 2 for r in records), scope
        assert records[0]["thresholds"] and records[0]["thresholds"] == records[1]["thresholds"]
        # rank 1 contributed no valid tokens, so the global kept fraction is rank 0's, close to 0.2
        assert all(abs(k - 0.2) < 0.12 for k in records[0]["kept_fraction"]), scope
