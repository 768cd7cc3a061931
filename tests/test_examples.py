"""The README's commands and the example scripts, on tiny settings, so they cannot rot."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def run(args, cwd):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# the experiment runner's recipes (those that name arms) go through its own parser: tests/test_ablation.py
@pytest.mark.parametrize(
    "recipe",
    sorted(  # the script's recipes; the experiment runner's (they name arms) are parsed in test_ablation.py
        p.name
        for p in (ROOT / "examples" / "recipes").glob("*.yaml")
        if "arms" not in yaml.safe_load(p.read_text()) and "_sft_" not in p.name
    ),
)
def test_recipes_parse_with_the_script_parser(recipe):
    from grpo_math import make_parser

    extra = [] if recipe == "tiny_cpu.yaml" else ["--use_cpu", "true", "--bf16", "false"]
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        ["--config", str(ROOT / "examples" / "recipes" / recipe), *extra]
    )
    assert training_args.forking_mode == "top" and training_args.forking_ratio == 0.2
    assert script_args.reward_funcs and model_args.model_name_or_path
    if "base" in recipe:  # paper-faithful
        assert (training_args.loss_type, training_args.epsilon, training_args.epsilon_high) == ("dapo", 0.2, 0.28)
        assert (training_args.beta, training_args.num_generations, training_args.max_completion_length) == (
            0.0,
            16,
            20480,
        )
        assert (training_args.learning_rate, training_args.weight_decay, training_args.max_grad_norm) == (
            1e-6,
            0.1,
            1.0,
        )
        assert "overlong" in script_args.reward_funcs
        # DAPO's dynamic sampling as the released code: filtered on accuracy, at most 10 rounds
        from forking_trl.rewards import get_reward_funcs

        assert training_args.dynamic_sampling and training_args.dynamic_sampling_max_rounds == 10
        assert training_args.dynamic_sampling_reward == get_reward_funcs(["accuracy"])[0].__name__


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "examples" / "recipes").glob("*_sft_*.yaml")))
def test_sft_recipes_parse_with_the_sft_parser(recipe):
    from sft import make_parser

    script_args, training_args, model_args = make_parser().parse_args_and_config(
        ["--config", str(ROOT / "examples" / "recipes" / recipe)]
    )
    assert script_args.dataset_name and script_args.max_train_samples and model_args.model_name_or_path
    # loss on the worked solution only, never on the problem (TRL's prompt-completion default)
    assert training_args.completion_only_loss in (None, True) and training_args.max_steps > 0


def _gsm8k_rows(path, n):
    rows = [
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora-merged"])
def test_sft_script_trains_on_worked_solutions_and_saves_a_plain_checkpoint(tiny_model, tmp_path, peft):
    import torch
    from sft import main, make_parser
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    args = ["--model_name_or_path", tiny_model, "--dataset_name", _gsm8k_rows(tmp_path / "gsm.jsonl", 6)]
    args += ["--max_train_samples", "4", "--per_device_train_batch_size", "2", "--max_steps", "2"]
    args += ["--learning_rate", "1e-2", "--max_length", "96", "--output_dir", str(out), "--report_to", "none"]
    args += ["--save_strategy", "no", "--use_cpu", "true", "--bf16", "false", "--dtype", "float32"]
    if peft:
        args += ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear"]
    main(*make_parser().parse_args_and_config(args))

    # a plain checkpoint every tool reads (the LoRA adapter merged, no adapter files), with changed weights
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert trained.keys() == start.keys()
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert changed and all(torch.isfinite(trained[k]).all() for k in changed)
    if peft:  # LoRA on the linear layers only: embeddings and norms untouched
        assert all("proj" in k for k in changed)


def test_sft_script_refuses_a_model_without_a_chat_template(tiny_base_model, tmp_path):
    from sft import main, make_parser

    args = ["--model_name_or_path", tiny_base_model, "--dataset_name", _gsm8k_rows(tmp_path / "gsm.jsonl", 2)]
    args += ["--output_dir", str(tmp_path / "sft"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    with pytest.raises(ValueError, match="no chat template"):
        main(*make_parser().parse_args_and_config(args))


def test_flags_override_yaml():
    from grpo_math import make_parser

    _, training_args, _ = make_parser().parse_args_and_config(
        [
            "--config",
            str(ROOT / "examples/recipes/tiny_cpu.yaml"),
            "--forking_mode",
            "bottom",
            "--forking_ratio",
            "0.8",
        ]
    )
    assert (training_args.forking_mode, training_args.forking_ratio) == ("bottom", 0.8)


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "zero2", "zero3"])
def test_accelerate_configs_parse(name):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    raw = yaml.safe_load((ROOT / "accelerate_configs" / f"{name}.yaml").read_text())
    assert config.num_processes == raw["num_processes"]
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


@pytest.mark.slow
def test_demo_script_grpo_script_and_evaluate_end_to_end(tmp_path):
    out = run(
        ["examples/demo.py", "--output_dir", str(tmp_path / "demo"), "--sft_steps", "5", "--grpo_steps", "2"], ROOT
    )
    # both arms from the same warm start, in the console and in summary.json; no per-step metric dicts printed
    assert "top tokens: mean reward" in out and "all tokens: mean reward" in out
    assert "{'loss'" not in out and "'reward':" not in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["arms"]) == {"top", "all"}
    assert 0 < summary["arms"]["top"]["kept_fraction_mean"] < 0.5 and summary["arms"]["all"]["kept_fraction_mean"] == 1
    assert (tmp_path / "demo" / "training.png").stat().st_size > 10_000
    for arm in ("top", "all"):
        assert (tmp_path / "demo" / f"metrics_{arm}.jsonl").read_text().count("\n") == 2

    model = str(tmp_path / "demo" / "tiny-sft")
    run(
        [
            "examples/grpo_math.py",
            "--config",
            "examples/recipes/tiny_cpu.yaml",
            "--model_name_or_path",
            model,
            "--output_dir",
            str(tmp_path / "grpo"),
            "--max_steps",
            "1",
        ],
        ROOT,
    )
    assert (tmp_path / "grpo" / "model.safetensors").exists()

    table = run(
        [
            "examples/evaluate.py",
            "--model",
            model,
            "--benchmarks",
            "aime24",
            "amc23",
            "--limit",
            "2",
            "--k",
            "2",
            "--max_new_tokens",
            "8",
            "--forking_threshold",
            "0.5",
            "--high_temperature",
            "1.2",
            "--pass_k",
            "4",
            "--output",
            str(tmp_path / "eval.json"),
        ],
        ROOT,
    )
    assert "aime24" in table and "pass@4" in table
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["results"]) == {"aime24", "amc23"} and report["results"]["aime24"]["problems"] == 2
    curve = report["results"]["aime24"]["pass@k"]
    assert list(curve) == ["1", "2", "4"] and all(0 <= v <= 1 for v in curve.values())


@pytest.mark.slow
def test_selection_benchmark_quick_mode():
    out = run(["benchmarks/bench_selection.py", "--quick", "--repeats", "1"], ROOT)
    assert "100,000" in out
    row = out.strip().splitlines()[-1].split()  # processes, total tokens, ours, ours exact, TRL, ratio
    assert row[0] == "2" and int(row[2].replace(",", "")) <= 16 * 1024 and int(row[3].replace(",", "")) <= 16 * 1024


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    """`gpu_check.py --smoke`: the GPU check's path at tiny shape on CPU, every part in its own process (the
    entropy benchmark with TRL's entropy_from_logits among its methods, ZeRO-3 under DS_ACCELERATOR=cpu)."""
    out = run(["benchmarks/gpu_check.py", "--smoke", "--jobs", "2", "--output-dir", str(tmp_path)], ROOT)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == ["bench_step", "bench_entropy", "zero3", "lora"]
    assert all(p["status"] == "ok" for p in summary["parts"]), out
    step, entropy, zero3, lora = (p["figures"] for p in summary["parts"])
    assert list(step["variants"]) == ["grpo", "forking_dynamic", "branching"]
    for figures in step["variants"].values():
        assert sum(figures["split"].values()) == pytest.approx(1.0) and figures["peak_mib"] > 0
    assert step["variants"]["forking_dynamic"]["informative"] == 1.0  # dynamic sampling trains informative groups
    grpo, branching = step["variants"]["grpo"], step["variants"]["branching"]
    assert branching["sampled_tokens"] < grpo["sampled_tokens"]  # a branch does not sample its copied prefix
    assert set(entropy["methods"]) == {"token_entropy", "trl_entropy_from_logits", "naive"}
    assert entropy["methods"]["token_entropy"]["max_abs_err_first8"] < 1e-3
    for training in (zero3, lora):  # trained for real: a reward with spread, so a gradient
        assert training["grad_norm"] > 0 and 0.1 < training["forking/kept_fraction"] < 0.3
    assert zero3["dynamic_sampling/rounds"] == 1  # the paper's recipe, dynamic sampling included
    assert zero3["launch"] == "1 process(es), DEEPSPEED ZeRO-3, cpu" and lora["launch"] == "1 process(es), NO, cpu"
    assert (tmp_path / "summary.md").read_text().count("| ok |") == 4


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible: the check would run")
    out = run(["benchmarks/gpu_check.py", "--output-dir", str(tmp_path)], ROOT)
    assert "no CUDA device is visible" in out and not (tmp_path / "summary.json").exists()


def test_gpu_check_parts_share_the_cores_only_in_smoke_mode(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import main

    with pytest.raises(SystemExit):  # on a GPU the parts are timed alone
        main(["--jobs", "2"])
    assert "--jobs must be 1, or more with --smoke only" in capsys.readouterr().err


def test_gpu_check_runs_parts_at_once_each_within_its_time_limit(tmp_path, monkeypatch):
    """Two parts at a time: a part past its limit is ended (its child too) and said so; the others finish; a third
    waits for a free slot; each gets its share of the cores."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    scripts = {
        "zero3": child + "print('pid', flush=True); time.sleep(60)",
        "bench_step": "import os; print('threads', os.environ['OMP_NUM_THREADS'])",
        "lora": "import sys; sys.exit(3)",
    }
    monkeypatch.setattr(gpu_check, "part_commands", lambda part, *a: ([sys.executable, "-c", scripts[part]], {}))
    monkeypatch.setattr(gpu_check, "figures", lambda *a: {})
    monkeypatch.setattr(gpu_check.os, "cpu_count", lambda: 4)
    limits = {"zero3": 3.0, "bench_step": 30, "lora": 30}
    seen = []
    results = gpu_check.run_parts(["zero3", "bench_step", "lora"], "m", tmp_path, True, limits, 2, seen.append)
    zero3, step, lora = (results[p] for p in ("zero3", "bench_step", "lora"))
    assert zero3["status"] == "failed" and zero3["reason"] == "time limit of 3 s reached" and zero3["seconds"] < 10
    assert step["status"] == "ok" and "threads 2" in (tmp_path / "bench_step.log").read_text()
    assert lora["status"] == "failed" and lora["reason"] == "exit code 3"
    assert len(seen) == 3  # told after each part
    import psutil

    time.sleep(0.5)
    assert not [p for p in psutil.Process().children(recursive=True) if "time.sleep(60)" in " ".join(p.cmdline())]


def test_evaluate_pass_at_k_counts_every_sample_drawn():
    """--k 16 --pass_k 4 draws 16 samples: pass@k takes n = 16, the samples counted (it took n = 4: pass@1 58.3%
    for 4, 3 and 0 of 16 right, whose avg@16 is 14.6%; and 16 of 16 right with --pass_k 8 raised)."""
    from evaluate import score_benchmark

    def group(right):
        return ["\\boxed{7}"] * right + ["\\boxed{8}"] * (16 - right)

    samples, golds = [group(4), group(3), group(0)], [{"solution": "7"}] * 3
    result = score_benchmark(samples, golds, k=16, pass_k=4)
    assert result["avg@k"] == pytest.approx(7 / 48)
    assert result["pass@k"]["1"] == pytest.approx(7 / 48)  # pass@1 is the mean accuracy
    assert list(result["pass@k"]) == ["1", "2", "4"] and result["pass@k_n"] == 16
    from forking_trl.evaluation import pass_at_k

    expected = (pass_at_k(16, 4, 4) + pass_at_k(16, 3, 4) + 0.0) / 3
    assert result["pass@k"]["4"] == pytest.approx(expected)
    full = score_benchmark([group(16)], [{"solution": "7"}], k=16, pass_k=8)
    assert full["pass@k"] == {"1": 1.0, "2": 1.0, "4": 1.0, "8": 1.0}
    # avg@k reads only the first k samples; pass@k all of them
    few = score_benchmark([group(4)], [{"solution": "7"}], k=2, pass_k=16)
    assert few["avg@k"] == 1.0 and few["pass@k"]["1"] == pytest.approx(4 / 16)


def test_evaluate_takes_a_recipes_held_out_split_and_grades_it_with_its_task():
    """`--recipe`: the runner's held-out problems of that recipe (Countdown: its settings, not the defaults), graded
    by its task, with the coverage of the solutions; a math benchmark keeps math-verify's grading."""
    from evaluate import benchmark, score_benchmark

    from forking_trl.ablation import make_parser, task_data

    recipe = str(ROOT / "examples/recipes/explore_countdown_cpu.yaml")
    task, rows = benchmark("ignored", None, recipe)
    ab, _ = make_parser().parse_args_and_config(["--config", recipe, "--output_dir", "unused"])
    assert rows == task_data(ab)[1] and len(rows) == 200 and task.name == "countdown"
    assert all(len(r["solutions"]) >= 2 for r in rows)  # the recipe's min_solutions, not the default 1
    samples = [[f"\\boxed{{{s}}}" for s in r["solutions"][:2]] for r in rows[:3]]
    result = score_benchmark(samples, rows[:3], k=2, pass_k=2, task=task)
    assert result["avg@k"] == 1.0 and result["coverage"]["coverage_at_k"]["2"] == 2.0
    math_task, aime = benchmark("aime24", 3)
    assert len(aime) == 3 and math_task.grade(["\\boxed{0}"], aime[:1]) in ([0.0], [1.0])
