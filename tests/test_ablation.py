"""The ablation runner: argument checks, the result writers on a small hand-made report, and --quick end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import yaml

from forking_trl.ablation import (
    AblationArguments,
    check_arms,
    make_parser,
    results_markdown,
    run_flags,
    verdicts,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="arms must be a non-empty list of all, top, bottom, random"):
        AblationArguments(arms=["top", "middle"])
    with pytest.raises(ValueError, match="eval_dataset"):
        AblationArguments(task="gsm8k_train")
    with pytest.raises(ValueError, match="num_eval must be >= 1"):
        AblationArguments(num_eval=0)


def test_each_run_differs_only_in_the_forking_fields_seed_and_directory(tmp_path):
    argv = [
        "--config",
        str(ROOT / "examples/recipes/ablation_cpu.yaml"),
        "--output_dir",
        "x",
        "--learning_rate",
        "2e-4",
    ]
    parsed = {}
    for arm in ("all", "top", "bottom", "random"):
        _, args = make_parser().parse_args_and_config(run_flags(argv, False, arm, 3, tmp_path / arm))
        parsed[arm] = args
        assert args.seed == 3 and args.output_dir == str(tmp_path / arm) and args.learning_rate == 2e-4
    assert [(a.forking_mode, a.forking_ratio) for a in parsed.values()] == [
        ("all", 1.0),
        ("top", 0.2),
        ("bottom", 0.8),
        ("random", 0.2),
    ]
    assert {(a.loss_type, a.beta, a.num_generations, a.max_steps) for a in parsed.values()} == {("dapo", 0.0, 8, 200)}


def small_report(values: dict[str, list[float]]) -> dict:
    def stat(xs):
        import statistics

        return {
            "mean": statistics.fmean(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs),
            "values": xs,
        }

    start = {
        "accuracy": {"greedy": 0.3, "sampled": 0.25, "k": 4, "num_problems": 10},
        "entropy": {"share_below_0.01": 0.6, "percentiles": {"p50": 0.001, "p80": 0.07, "p95": 0.9}},
    }
    arms = {}
    for arm, xs in values.items():
        runs = [
            {
                "seed": i,
                "history": [
                    {"step": s, "entropy": 0.2 - 0.01 * s, "entropy/p80": 0.1, "entropy/share_below_0.01": 0.6}
                    for s in (1, 2, 3)
                ],
            }
            for i in range(len(xs))
        ]
        arms[arm] = {
            "greedy": stat(xs),
            "sampled": stat(xs),
            "overlap": stat([0.9] * len(xs)),
            "below_0.01": stat([0.7] * len(xs)),
            "final_entropy": {"share_below_0.01": stat([0.7] * len(xs))},
            "runs": runs,
        }
    return {"command": "python examples/ablation.py ...", "start": start, "arms": arms, "wall_seconds": 60}


def test_verdicts_compare_with_the_seed_spread():
    report = small_report({"all": [0.50, 0.52, 0.48], "top": [0.51, 0.49, 0.50], "bottom": [0.30, 0.31, 0.29]})
    top, bottom = verdicts(report)
    assert top.startswith("- top vs all: greedy +0.0 points") and top.count("within the seed spread") == 2
    assert bottom.startswith("- bottom vs all: greedy -20.0 points") and bottom.count("exceeds the seed spread") == 2
    one_seed = small_report({"all": [0.5], "top": [0.6]})
    assert verdicts(one_seed) == [
        "- top vs all: greedy +10.0 points (one seed: no spread to judge it by); avg@k +10.0 points (one seed: no "
        "spread to judge it by)."
    ]


def test_writers_make_every_file(tmp_path):
    report = small_report({"all": [0.5, 0.6], "top": [0.55, 0.5], "bottom": [0.3, 0.35], "random": [0.4, 0.45]})
    write_results(report, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["arms"]["top"]["greedy"]["n"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| top | 52.5 ± 3.5 | +22.5 |" in table and "| bottom |" in table and results_markdown(report) == table
    for png in ("accuracy.png", "entropy_training.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def run_quick(recipe: str, out, *flags: str) -> tuple[dict, str]:
    """`examples/ablation.py --config RECIPE --quick true` in a process; (results.json, stdout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "examples/ablation.py", "--config", f"examples/recipes/{recipe}", "--quick", "true"]
    done = subprocess.run(
        [*cmd, "--output_dir", str(out), *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), done.stdout


def test_real_model_recipe_parses_through_the_same_runner():
    argv = ["--config", str(ROOT / "examples/recipes/ablation_qwen3_0.6b.yaml"), "--output_dir", "x"]
    ab, args = make_parser().parse_args_and_config([*argv, "--use_cpu", "true", "--bf16", "false"])
    assert ab.start_model == "Qwen/Qwen3-0.6B-Base" and ab.task == "gsm8k_train" and ab.eval_dataset == "math500"
    assert ab.arms == ["all", "top", "bottom", "random"] and len(ab.seeds) >= 3
    assert (args.loss_type, args.beta, args.epsilon_high, args.use_vllm) == ("dapo", 0.0, 0.28, True)
    from forking_trl.ablation import task_data

    train, held = task_data(ab)
    assert len(train) == 7473 and len(held) == 500 and train[0]["solution"] and held[0]["solution"]


def test_arms_are_named_configurations_validated_before_training(tmp_path):
    recipe = ["--config", str(ROOT / "examples/recipes/ablation_cpu.yaml"), "--output_dir", str(tmp_path)]
    custom = '{"top10": {"forking_mode": "top", "forking_ratio": 0.1}, "kl_cov": {"kl_cov_ratio": 0.05}}'
    ab, _ = make_parser().parse_args_and_config([*recipe, "--arms", "top10", "kl_cov", "--arm_configs", custom])
    assert ab.arm_fields("top10") == {"forking_mode": "top", "forking_ratio": 0.1, "entropy_method": "none"}
    assert ab.arm_fields("kl_cov")["entropy_method"] == "kl_cov" and ab.arm_fields("kl_cov")["kl_cov_ratio"] == 0.05
    assert ab.arm_fields("entropy_adv") == {
        "forking_mode": "all",
        "forking_ratio": 1.0,
        "entropy_method": "entropy_adv",
    }
    _, args = make_parser().parse_args_and_config(
        run_flags(recipe, False, "top10", 1, tmp_path, ab.arm_fields("top10"))
    )
    assert (args.forking_mode, args.forking_ratio, args.entropy_method, args.seed) == ("top", 0.1, "none", 1)
    with pytest.raises(ValueError, match="not an arm field"):
        AblationArguments(arms=["x"], arm_configs={"x": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match="arms must be a non-empty list of .*clip_cov, kl_cov, entropy_adv, x"):
        AblationArguments(arms=["y"], arm_configs={"x": {"forking_mode": "top"}})
    for bad, reason in (({"forking_ratio": 0}, "forking_ratio must be"), ({"clip_cov_lb": 9.0}, "clip_cov_lb")):
        argv = [*recipe, "--arms", "x", "--arm_configs", json.dumps({"x": bad})]
        ab, _ = make_parser().parse_args_and_config(argv)
        with pytest.raises(ValueError, match=f"arm 'x' .* is not a valid configuration: .*{reason}"):
            check_arms(ab, argv, tmp_path)
    argv = [*recipe, "--arms", "x", "--arm_configs", '{"x": {"entropy_method": "foo"}}']
    ab, _ = make_parser().parse_args_and_config(argv)
    with pytest.raises(ValueError, match="invalid choice: 'foo'"):
        check_arms(ab, argv, tmp_path)


@pytest.mark.slow
def test_explore_recipe_quick_runs_every_arm_with_coverage_and_a_recipe_arm(tmp_path):
    """`--quick` over the exploration recipe (Countdown): its eight arms (all, top, random, the three entropy methods,
    branching with group and with tree credit) plus an arm defined on the command line; pass@k, coverage@k and the
    answers' diversity for the start model and every run; the methods' and branching's metrics in the histories; the
    generated tokens of each run, fewer for branching (copied prefixes are not sampled). It also stands for the
    collapse recipe's quick run: the same six arms, the same runner, on the chain task (its arms validate below)."""
    # a recipe arm: the entropy advantage on the top tokens, with rho annealed from 1.0 to 0.2 over the 3 steps
    top_adv = {"forking_mode": "top", "forking_ratio": 1.0, "entropy_method": "entropy_adv"}
    top_adv |= {"forking_ratio_schedule": "linear", "forking_ratio_end": 0.2}
    recipe_arms = ["all", "top", "random", "clip_cov", "kl_cov", "entropy_adv", "branching_group", "branching_tree"]
    arm_configs = yaml.safe_load((ROOT / "examples/recipes/explore_countdown_cpu.yaml").read_text())["arm_configs"]
    arms = [*recipe_arms, "top_adv"]
    # the built-in clip_cov arm redefined so that Clip-Cov acts within 3 steps (set for every arm, the other arms
    # would refuse these fields: they would be ignored there)
    clip_cov = {"entropy_method": "clip_cov", "clip_cov_ratio": 0.05, "clip_cov_lb": -1000}
    # the runs one after another in the runner's process (--launcher debug): nine local jobs spent most of this test
    # importing torch and TRL again; the local launcher has its own tests (two at once, resume, failures, signals)
    report, stdout = run_quick(
        "explore_countdown_cpu.yaml",
        tmp_path,
        *("--arms", *arms, "--arm_configs", json.dumps({**arm_configs, "top_adv": top_adv, "clip_cov": clip_cov})),
        *("--launcher", "debug"),
    )
    assert list(report["arms"]) == arms and report["ablation"]["task"] == "countdown"
    assert report["arm_fields"]["top_adv"] == top_adv
    start = report["start"]
    assert list(start["pass_at_k"]["pass_at_k"]) == ["1", "2", "4"]  # --quick: n = 4
    assert (
        list(start["coverage"]["coverage_at_k"]) == ["1", "2", "4"] and start["coverage"]["solutions_per_problem"] >= 2
    )
    assert start["coverage"]["coverage_at_k"]["1"] == pytest.approx(start["pass_at_k"]["pass_at_k"]["1"])
    assert start["answers"]["distinct_answers"] >= 1
    for arm in arms:
        a = report["arms"][arm]
        assert set(a["pass_at_k"]) == set(a["coverage"]) == {"1", "2", "4"} and a["distinct_answers"]["n"] == 1
        assert a["runs"][0]["generated_tokens"] > 0

    def seen(arm, key):
        return [h[key] for h in report["arms"][arm]["runs"][0]["history"] if key in h]

    assert seen("all", "cov/mean") and not seen("all", "clip_cov/clipped_fraction")
    assert max(seen("clip_cov", "clip_cov/clipped_fraction")) > 0
    assert max(seen("kl_cov", "kl_cov/penalized_fraction")) > 0  # steps_per_generation 2: off-policy, no note
    assert "KL-Cov on a fully on-policy recipe" not in stdout
    assert max(seen("entropy_adv", "entropy_adv/shaping")) > 0 and max(seen("top_adv", "entropy_adv/shaping")) > 0
    ratios = seen("top_adv", "forking/ratio")  # the schedule as an arm: 1.0, 0.6, 0.2 over the 3 steps
    assert ratios[0] == 1.0 and ratios[-1] == pytest.approx(0.2) and ratios == sorted(ratios, reverse=True)
    for arm in ("branching_group", "branching_tree"):
        assert (
            max(seen(arm, "branching/forks_per_root")) > 0 and min(seen(arm, "branching/generated_tokens_ratio")) < 1
        )
        assert (
            report["arms"][arm]["runs"][0]["generated_tokens"] < report["arms"]["all"]["runs"][0]["generated_tokens"]
        )
    table = (tmp_path / "results.md").read_text()
    assert (
        "| kl_cov |" in table and "pass@4 %" in table and "| model | coverage@1 | coverage@2 | coverage@4 |" in table
    )
    assert "distinct answers / problem" in table and "coverage@4 gain per M tokens" in table
    assert "branching_tree vs all" in stdout and "coverage@4" in stdout
    for plot in ("pass_at_k.png", "coverage.png", "exploration.png"):
        assert (tmp_path / plot).stat().st_size > 10_000


def test_pass_at_k_table_verdicts_and_plot(tmp_path):
    report = small_report({"all": [0.5, 0.52, 0.48], "top": [0.51, 0.49, 0.5]})

    def curve(scale):
        return {"1": 0.3 * scale, "2": 0.45 * scale, "4": 0.6 * scale}

    report["start"]["pass_at_k"] = {"n": 4, "num_problems": 10, "pass_at_k": curve(1.0), "correct": [1] * 10}
    for arm, scales in (("all", [1.0, 1.1, 0.9]), ("top", [1.3, 1.35, 1.25])):
        runs = report["arms"][arm]["runs"]
        for run, scale in zip(runs, scales):
            run["pass_at_k"] = {"n": 4, "num_problems": 10, "pass_at_k": curve(scale)}
        from forking_trl.ablation.report import CURVES, _curve_summary

        report["arms"][arm]["pass_at_k"] = _curve_summary(runs, CURVES[0])
    write_results(report, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| model | pass@1 % | pass@2 % | pass@4 % |" in table and "| start | 30.0 | 45.0 | 60.0 |" in table
    assert "| top | 39.0 ± 1.5 | 58.5 ± 2.3 | 78.0 ± 3.0 |" in table
    (line,) = verdicts(report)
    assert "pass@1 +9.0 points" in line and "pass@4 +18.0 points" in line and "exceeds the seed spread" in line
    assert (tmp_path / "pass_at_k.png").stat().st_size > 10_000
    assert (tmp_path / "exploration.png").stat().st_size > 10_000  # pass@1 against pass@4, one dot per run


@pytest.mark.parametrize(
    "recipe",
    [
        *("ablation_cpu.yaml", "collapse_cpu.yaml", "collapse_unstable_cpu.yaml", "explore_countdown_cpu.yaml"),
        "smollm2_135m_lora_cpu.yaml",
    ],
)
def test_runner_recipes_parse_and_every_arm_validates(recipe, tmp_path, capsys):
    argv = ["--config", str(ROOT / "examples/recipes" / recipe), "--output_dir", str(tmp_path)]
    ab, args = make_parser().parse_args_and_config(argv)
    check_arms(ab, argv, tmp_path)
    if recipe.startswith("collapse"):
        assert ab.arms == ["all", "top", "random", "clip_cov", "kl_cov", "entropy_adv"] and ab.pass_k == 64
        assert args.steps_per_generation == 2 > args.gradient_accumulation_steps  # KL-Cov's penalty acts
        assert "on-policy" not in capsys.readouterr().out
    if recipe.startswith("explore"):  # the collapse recipe's six arms and branching, at the same G; Countdown
        assert ab.arms[:6] == ["all", "top", "random", "clip_cov", "kl_cov", "entropy_adv"] and ab.pass_k == 64
        assert ab.make_task().spec.min_solutions == 2 and args.steps_per_generation == 2
        for arm in ("branching_group", "branching_tree"):
            assert ab.arm_fields(arm)["branching"] is True and args.num_generations == 8
    if recipe.startswith("smollm2"):  # a real model by name, LoRA, the instruction after each question
        assert ab.start_model == "smollm2-135m-instruct" and ab.peft_config().r == 16 and ab.seeds == [0, 1, 2]
        assert (
            ab.arms == ["all", "top", "bottom", "top_kept"]
            and ab.arm_fields("top_kept")["forking_normalizer"] == "kept"
        )
        assert ab.make_task().rows(1, 0)[0]["prompt"][0]["content"].endswith("? Answer with just the number.")


def test_dataset_task_drops_held_out_problems_seen_in_training(capsys):
    """Issue 15, finding 4: a held-out problem that is also a training problem is dropped, and the count said."""
    from forking_trl.ablation import task_data

    ab = AblationArguments(task="gsm8k_train", eval_dataset="gsm8k_train", num_train=7000, num_eval=50)
    train, held = task_data(ab)
    seen = {json.dumps(r["prompt"]) for r in train}
    assert len(held) == 50 and not any(json.dumps(r["prompt"]) in seen for r in held)
    assert "dropped" in capsys.readouterr().out
    ab = AblationArguments(task="gsm8k_train", eval_dataset="gsm8k_train", num_eval=50)  # training takes every row
    with pytest.raises(ValueError, match="no held-out problem is left"):
        task_data(ab)


def test_start_model_is_rebuilt_when_its_settings_change(tmp_path, capsys):
    """Issue 15, finding 3: an output directory's start model built with other settings is not silently reused."""
    from forking_trl.ablation import start_model, task_data

    def build(steps):
        ab = AblationArguments(num_train=64, num_eval=4, sft_steps=steps, sft_batch_size=4, tiny_hidden_size=32)
        path = Path(start_model(ab, tmp_path, task_data(ab)[0]))
        return json.loads((tmp_path / "start-settings.json").read_text()), (path / "model.safetensors").read_bytes()

    first_settings, first = build(1)
    assert build(1) == (first_settings, first)  # same settings: reused
    assert "rebuilding" not in capsys.readouterr().out
    second_settings, second = build(3)
    assert second_settings["sft_steps"] == 3 and second != first
    assert "rebuilding" in capsys.readouterr().out


def test_an_interrupted_rebuild_leaves_no_record_of_other_settings(tmp_path, capsys, monkeypatch):
    """Issue 22, finding 2: settings A built, B interrupted during its warm start, A again must rebuild A (it reused
    B's half-built hidden-64 base under A's stale record, silently)."""
    import forking_trl.ablation.start as ablation

    def build(hidden):
        ab = AblationArguments(num_train=64, num_eval=4, sft_steps=1, sft_batch_size=4, tiny_hidden_size=hidden)
        return Path(ablation.start_model(ab, tmp_path, ablation.task_data(ab)[0]))

    def hidden_size(path):
        return json.loads((path / "config.json").read_text())["hidden_size"]

    assert hidden_size(build(32)) == 32
    with monkeypatch.context() as m:

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        m.setattr(ablation, "_warm_start", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(64)
    assert not (tmp_path / "start-settings.json").exists()  # nothing on disk is described by a record
    assert hidden_size(tmp_path / "start-base") == 64  # B's half-built base is there
    capsys.readouterr()
    path = build(32)
    assert hidden_size(path) == 32 and hidden_size(tmp_path / "start-base") == 32
    assert "rebuilding" in capsys.readouterr().out
    assert json.loads((tmp_path / "start-settings.json").read_text())["tiny_hidden_size"] == 32


def test_warm_start_is_the_same_whatever_the_callers_thread_count(tmp_path):
    """Issue 15, finding 8: the start model's weights do not depend on torch's thread count (on this machine, 3
    threads gave other weights than 1 after 5 steps; 1, 2 and 4 agreed), so the warm start runs in one thread."""
    import torch

    from forking_trl.ablation import sft_warm_start
    from forking_trl.tasks import Chain
    from forking_trl.tiny import build_tiny_model, torch_threads

    base = build_tiny_model(tmp_path / "base", hidden_size=128, num_layers=2)
    rows = Chain().rows(64, seed=1)
    weights = {}
    for threads in (1, 3):
        with torch_threads(threads):
            out = sft_warm_start(base, tmp_path / f"sft{threads}", rows, steps=5, lr=3e-3, batch_size=16, seed=0)
            assert torch.get_num_threads() == threads  # the caller's setting is left as it was
        weights[threads] = (out / "model.safetensors").read_bytes()
    assert weights[1] == weights[3]


@pytest.mark.parametrize(
    "recipe, task, digest",
    [
        ("ablation_cpu", "chain", "268fc282edaaeaaa"),
        ("collapse_cpu", "chain", "268fc282edaaeaaa"),
        ("collapse_unstable_cpu", "chain", "268fc282edaaeaaa"),
        ("explore_countdown_cpu", "countdown", "12654a938b9d8153"),
    ],
)
def test_the_cpu_recipes_start_from_the_shipped_start_model(recipe, task, digest, tmp_path, capsys, monkeypatch):
    """Issue 15, finding 8: the recipes' start model is shipped, so every machine starts from the same weights; it is
    copied (never warmed up) for their settings, and warmed up here when asked to or when the settings differ."""
    import hashlib

    from forking_trl.ablation import BUNDLED_START_MODELS, make_parser, start_model
    from forking_trl.ablation import start as ablation

    root = Path(__file__).resolve().parents[1]
    ab, _ = make_parser().parse_args_and_config(
        ["--config", str(root / "examples" / "recipes" / f"{recipe}.yaml"), "--output_dir", str(tmp_path)]
    )
    warmed = []
    monkeypatch.setattr(ablation, "sft_warm_start", lambda base, out, *a, **k: warmed.append(out) or out.mkdir())
    path = Path(start_model(ab, tmp_path, train=[]))
    assert warmed == [] and "the one shipped for these settings" in capsys.readouterr().out
    weights = (path / "model.safetensors").read_bytes()
    assert weights == (BUNDLED_START_MODELS[task] / "model.safetensors").read_bytes()
    # the weights the README's experiments started from (docs/ablation, docs/collapse, docs/explore)
    assert hashlib.sha256(weights).hexdigest().startswith(digest)
    assert json.loads((tmp_path / "start-settings.json").read_text())["origin"] == "shipped"

    ab.bundled_start_model = False  # the same settings, warmed up here: replaced, with a message
    start_model(ab, tmp_path, train=[])
    assert warmed == [tmp_path / "start-model"] and "rebuilding" in capsys.readouterr().out
    assert json.loads((tmp_path / "start-settings.json").read_text())["origin"] == "built here"


def test_every_field_an_arm_sets_is_validated_and_null_is_unset(tmp_path):
    """Issue 22, finding 6: a dynamic_sampling_reward typo passed the check and failed once that run's trainer was
    built (after other arms had trained); null reached the config as the string 'None'."""
    from forking_trl.ablation import parse_run, unset_fields

    recipe = ["--config", str(ROOT / "examples/recipes/ablation_cpu.yaml"), "--output_dir", str(tmp_path)]

    def check(arm_fields, *flags):
        argv = [*recipe, *flags, "--arms", "x", "--arm_configs", json.dumps({"x": arm_fields})]
        ab, _ = make_parser().parse_args_and_config(argv)
        check_arms(ab, argv, tmp_path)
        overrides = ab.arm_fields("x")
        return parse_run(run_flags(argv, False, "x", 0, tmp_path / "x", overrides), unset_fields(overrides))[1]

    typo = {"dynamic_sampling": True, "dynamic_sampling_reward": "acuracy_reward"}
    with pytest.raises(ValueError, match=r"arm 'x' .*dynamic_sampling_reward='acuracy_reward' is not a reward"):
        check(typo)
    args = check({"dynamic_sampling": True, "dynamic_sampling_reward": "accuracy_reward"})
    assert args.dynamic_sampling_reward == "accuracy_reward"
    # null is unset, also over a recipe (here a flag) that sets it
    flags = ["--dynamic_sampling", "true", "--dynamic_sampling_reward", "accuracy_reward"]
    args = check({"dynamic_sampling_reward": None}, *flags)
    assert args.dynamic_sampling_reward is None
    assert "None" not in run_flags(recipe, False, "all", 0, tmp_path, {"dynamic_sampling_reward": None})


# ---------------------------------------------------------------------------------------------------------------
# the runs as jobs (submitit): two at once, resume, a failed run isolated, GPU placement, Slurm, Ctrl-C


@pytest.mark.slow
def test_jobs_run_two_at_once_resume_and_isolate_a_failed_run(tmp_path, monkeypatch, capsys):
    """Issue 22 finding 6 and issue 23: the local executor trains two runs at once; a run that fails (here: its
    start model path broken in its specification, a real failure inside its job) is reported with the end of its
    log while the others finish, results are written from those and name it, the command fails at the end; the same
    command again skips the finished runs, and a changed arm retrains that arm only."""
    import forking_trl.ablation as ablation

    make_spec = ablation.run_spec

    def broken_for_bad(ab, argv, arm, seed, out, start_model, checksum):
        spec = make_spec(ab, argv, arm, seed, out, start_model, checksum)
        return {**spec, "start_model": str(tmp_path / "no-such-model")} if arm == "bad" else spec

    monkeypatch.setattr(ablation, "run_spec", broken_for_bad)
    argv = ["--config", str(ROOT / "examples/recipes/ablation_cpu.yaml"), "--quick", "true", "--parallel", "2"]
    argv += ["--output_dir", str(tmp_path), "--arms", "all", "top", "bad"]
    configs = {"bad": {}, "top": {"forking_mode": "top", "forking_ratio": 0.2}}

    def run(configs):
        with pytest.raises(ablation.RunsFailed, match=r"1 of 3 runs failed: bad seed 0"):
            ablation.run_ablation([*argv, "--arm_configs", json.dumps(configs)])
        return json.loads((tmp_path / "results.json").read_text()), capsys.readouterr()

    report, seen = run(configs)
    assert list(report["arms"]) == ["all", "top"] and [f["arm"] for f in report["failed_runs"]] == ["bad"]
    assert {"greedy", "sampled", "k"} <= set(report["start"]["accuracy"]) and "| top |" in (
        tmp_path / "results.md"
    ).read_text()
    assert "no-such-model" in seen.out + seen.err  # the end of the failed job's log
    assert "Runs that failed" in (tmp_path / "results.md").read_text()
    for name in ("results.md", "accuracy.png", "entropy_training.png", "start_entropy_histogram.png"):
        assert (tmp_path / name).stat().st_size > 500, name
    runs = {arm: report["arms"][arm]["runs"][0] for arm in ("all", "top")}
    assert runs["all"]["train_started"] < runs["top"]["train_finished"]  # trained at the same time
    assert runs["top"]["train_started"] < runs["all"]["train_finished"]
    assert {"entropy/p50", "entropy/share_below_0.01"} <= set(runs["top"]["history"][-1])

    again, seen = run(configs)  # the same command: the finished runs are not trained again
    assert "resume: 2 of 3 runs already have a result" in seen.out
    assert "its measurement in" in seen.out and again["start"] == report["start"]  # nor the start model measured
    assert again["arms"]["top"]["runs"][0]["train_started"] == runs["top"]["train_started"]

    changed, seen = run({**configs, "top": {"forking_mode": "top", "forking_ratio": 0.5}})  # top changed
    assert "resume: 1 of 3 runs already have a result" in seen.out
    assert changed["arms"]["all"]["runs"][0]["train_started"] == runs["all"]["train_started"]
    assert changed["arms"]["top"]["runs"][0]["train_started"] > runs["top"]["train_finished"]  # retrained


class FakeJob:
    def __init__(self, spec, done_after=0):
        self.spec, self.polls, self.done_after, self.cancelled = spec, 0, done_after, False

    def done(self):
        self.polls += 1
        return self.polls > self.done_after

    def exception(self):
        return None

    def result(self):
        return {"arm": self.spec["arm"], "devices": self.spec.get("devices")}

    def cancel(self, check=True):
        self.cancelled = True


class FakeExecutor:
    """submitit's executor interface as `run_jobs` uses it: parameters, then submit(fn, spec) -> job."""

    def __init__(self, done_after=0):
        self.parameters, self.submitted, self.done_after = {}, [], done_after

    def update_parameters(self, **kwargs):
        self.parameters.update(kwargs)

    def submit(self, fn, *args):  # a local job: (the wrapper, job_fn, spec); else (job_fn, spec)
        spec = args[-1]
        job = FakeJob({**spec, "devices": self.parameters.get("visible_gpus")}, self.done_after)
        self.submitted.append(job)
        return job


def job_args(**overrides):
    return SimpleNamespace(**{"launcher": "local", "rerun": True, "parallel": 2, "processes_per_run": 1, **overrides})


def fake_specs(n, tmp_path):
    return [{"arm": f"a{i}", "seed": 0, "output_dir": str(tmp_path / f"r{i}")} for i in range(n)]


def test_local_jobs_are_placed_one_gpu_each_round_robin(tmp_path, monkeypatch):
    from forking_trl.ablation import jobs

    assert jobs.gpu_slots(0, 1) == [] and jobs.gpu_slots(4, 2) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="processes_per_run=3 needs as many GPUs; this machine has 2"):
        jobs.gpu_slots(2, 3)
    executor = FakeExecutor(done_after=1)
    monkeypatch.setattr(jobs, "device_count", lambda: 3)
    monkeypatch.setattr(jobs, "make_executor", lambda ab, folder: executor)
    monkeypatch.setattr(jobs, "POLL_S", 0.0)
    outcomes = jobs.run_jobs(fake_specs(5, tmp_path), job_args(parallel=2), tmp_path, None, lambda *a: None)
    assert [o.result["arm"] for o in outcomes] == ["a0", "a1", "a2", "a3", "a4"]
    # two at a time on 3 GPUs: never two running jobs on one GPU, every GPU used
    assert [job.spec["devices"] for job in executor.submitted] == [(0,), (1,), (0,), (1,), (0,)]
    executor = FakeExecutor(done_after=100)  # none finishes: parallel 4 on 3 GPUs shares the least busy one
    monkeypatch.setattr(jobs, "make_executor", lambda ab, folder: executor)
    calls = []

    def interrupt_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(jobs.time, "sleep", interrupt_once)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: the running jobs are cancelled
        jobs.run_jobs(fake_specs(6, tmp_path), job_args(parallel=4), tmp_path, None, lambda *a: None)
    assert [job.spec["devices"] for job in executor.submitted] == [(0,), (1,), (2,), (0,)]
    assert all(job.cancelled for job in executor.submitted)


def test_a_sigterm_to_the_runner_cancels_its_jobs_as_ctrl_c_does(tmp_path, monkeypatch):
    """`kill <runner>` (SIGTERM) left its local jobs training as orphans: only Ctrl-C cancelled them."""
    import signal

    from forking_trl.ablation import jobs

    executor = FakeExecutor(done_after=100)
    monkeypatch.setattr(jobs, "make_executor", lambda ab, folder: executor)
    monkeypatch.setattr(jobs, "device_count", lambda: 0)
    monkeypatch.setattr(jobs.time, "sleep", lambda s: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        jobs.run_jobs(fake_specs(3, tmp_path), job_args(parallel=2), tmp_path, None, lambda *a: None)
    assert len(executor.submitted) == 2 and all(job.cancelled for job in executor.submitted)
    assert signal.getsignal(signal.SIGTERM) is before  # restored once the jobs are done with


def test_slurm_submits_one_array_job_with_the_runs_resources(tmp_path, monkeypatch):
    """As far as it goes without a cluster: a stub `sbatch` on PATH (submitit's own test approach) receives the
    generated submission for the recipe's resources, one array of all the runs."""
    from forking_trl.ablation import jobs, runs

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch_calls\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that it runs on a Slurm login node
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ab = AblationArguments(
        launcher="slurm",
        parallel=3,
        threads_per_run=4,
        processes_per_run=2,
        slurm_partition="gpu",
        slurm_mem_gb=64,
        job_timeout_min=240,
        slurm_additional={"account": "my-lab", "qos": "high"},
    )
    executor = jobs.make_executor(ab, tmp_path / "jobs")
    submitted = jobs.submit_slurm(executor, runs.run_job, fake_specs(5, tmp_path))
    assert [job.job_id for job in submitted] == [f"4242_{i}" for i in range(5)]
    (call,) = (tmp_path / "sbatch_calls").read_text().splitlines()
    script = Path(call.split()[-1]).read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=240",
        "#SBATCH --array=0-4%3",
        "#SBATCH --account=my-lab",
        "#SBATCH --qos=high",
        "#SBATCH --job-name=forking-trl",
    ):
        assert line in script, line


def test_launcher_fields_are_validated():
    with pytest.raises(ValueError, match="launcher must be one of 'local', 'slurm', 'debug'"):
        AblationArguments(launcher="kubernetes")
    with pytest.raises(ValueError, match="processes_per_run must be >= 1"):
        AblationArguments(processes_per_run=0)
    with pytest.raises(ValueError, match="slurm_additional must be a mapping"):
        AblationArguments(slurm_additional="{not json")
    assert AblationArguments(slurm_additional='{"qos": "high"}').slurm_additional == {"qos": "high"}
    with pytest.raises(ValueError, match="accelerate_config='nope.yaml' is not a file"):
        AblationArguments(accelerate_config="nope.yaml")


def test_lora_and_task_instruction_fields_are_validated(tmp_path):
    """LoRA and the task's instruction: a setting that would be ignored is refused, naming it; ZeRO-3 with LoRA is
    refused (the adapter is merged on the main process, which sharded weights do not allow)."""
    with pytest.raises(ValueError, match="lora_alpha set without lora_r"):
        AblationArguments(lora_alpha=64)
    with pytest.raises(ValueError, match="lora_r must be >= 0"):
        AblationArguments(lora_r=-1)
    with pytest.raises(ValueError, match="task_instruction is for the chain and arithmetic tasks; task='countdown'"):
        AblationArguments(task="countdown", task_instruction="Be brief.")
    zero3 = ROOT / "accelerate_configs/zero3.yaml"
    with pytest.raises(ValueError, match="lora_r with a ZeRO-3 accelerate_config"):
        AblationArguments(lora_r=8, processes_per_run=2, accelerate_config=str(zero3))
    ab = AblationArguments(lora_r=8, lora_target_modules="q_proj, v_proj", task="arithmetic", task_instruction="Hi.")
    assert ab.peft_config().r == 8 and set(ab.peft_config().target_modules) == {"q_proj", "v_proj"}
    assert AblationArguments().peft_config() is None
    assert ab.make_task().rows(1, 0)[0]["prompt"][0]["content"].endswith("? Hi.")


def test_a_lora_run_is_measured_on_its_merged_model(tmp_path, monkeypatch):
    """`lora_r`: the run trains an adapter (the base weights do not move), and `final/` is the merged model, a plain
    checkpoint that `measure` loads and that differs from the start model by the adapter's product."""
    import torch
    from safetensors.torch import load_file

    import forking_trl.ablation as ablation

    argv = ["--config", str(ROOT / "examples/recipes/ablation_cpu.yaml"), "--quick", "true", "--launcher", "debug"]
    argv += ["--output_dir", str(tmp_path), "--arms", "top", "--lora_r", "4", "--max_steps", "2"]
    argv += ["--learning_rate", "1e-2"]
    report = ablation.run_ablation(argv)
    final = tmp_path / "runs" / "top-seed0" / "final"
    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()
    shipped = ablation.BUNDLED_START_MODELS["chain"]  # --quick starts from the shipped start model
    trained, start = load_file(final / "model.safetensors"), load_file(shipped / "model.safetensors")
    assert set(trained) == set(start)  # no lora_ weights left: merged
    moved = [k for k in start if not torch.equal(trained[k], start[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)  # the adapted linear layers only
    assert "accuracy" in report["arms"]["top"]["runs"][0]


def test_the_start_measurement_is_reused_only_for_the_same_model_rows_and_settings(tmp_path, monkeypatch):
    """A resumed experiment measured its start model again every time: minutes for a real model on CPU."""
    import forking_trl.ablation as ablation
    from forking_trl.analysis import ScoredCompletion

    calls = []

    def fake_measure(model_path, ab, held):
        calls.append(model_path)
        scored = [ScoredCompletion(prompt="p", token_ids=[1, 2], tokens=["a", "b"], entropies=[0.5, 0.0])]
        return {"accuracy": {"greedy": 0.5}, "entropy": {}}, SimpleNamespace(samples=[["p", [1, 2]]]), scored

    monkeypatch.setattr(ablation, "measure", fake_measure)
    ab, held = AblationArguments(), [{"prompt": "x", "solution": "1"}]
    first = ablation._measured_start(ab, tmp_path, held, "m", "c1")
    assert ablation._measured_start(ab, tmp_path, held, "m", "c1") == first and len(calls) == 1
    assert first[2][0].entropies == [0.5, 0.0]  # the scored completions come back as they were
    for changed in (
        (ab, held, "c2"),  # another model
        (ab, [{"prompt": "y", "solution": "1"}], "c1"),  # other held-out rows
        (AblationArguments(eval_k=2), held, "c1"),  # another measurement setting
    ):
        ablation._measured_start(changed[0], tmp_path, changed[1], "m", changed[2])
    assert len(calls) == 4
    (tmp_path / "start.json").write_text('{"key": ')  # unreadable: measured again, not an error
    ablation._measured_start(AblationArguments(eval_k=2), tmp_path, held, "m", "c1")
    assert len(calls) == 5


def test_a_result_is_reused_only_for_the_same_specification(tmp_path):
    from forking_trl.ablation import jobs, runs

    identity = {"training": {"seed": 0, "forking_ratio": 0.2}, "experiment": {"num_eval": 24}}
    spec = {"identity": identity, "threads": 1, "processes": 1, "start_checksum": "abc", "output_dir": str(tmp_path)}
    assert jobs.cached_result(spec) is None
    runs.write_result(spec, {"accuracy": 1})
    assert jobs.cached_result(spec)["accuracy"] == 1
    changes = (
        {"start_checksum": "other"},
        {"identity": {**identity, "training": {"seed": 1, "forking_ratio": 0.2}}},
        {"identity": {**identity, "experiment": {"num_eval": 25}}},
        {"threads": 2},
        {"processes": 2},
    )
    for change in changes:
        assert jobs.cached_result({**spec, **change}) is None, change


def _one_seed_of(report: dict, seed: int) -> dict:
    arms = {arm: {**a, "runs": [r for r in a["runs"] if r["seed"] == seed]} for arm, a in report["arms"].items()}
    return {**report, "arms": arms, "ablation": {**report["ablation"], "seeds": [seed], "parallel": 1 + seed}}


def test_merged_reports_of_one_experiment_equal_the_report_of_one_command(tmp_path):
    """The real model's report (docs/real/rlvr), split into one report per seed and merged again: every arm's
    summary comes back equal, and results.md names the commands and holds the same table."""
    from forking_trl.ablation import merge_reports, merge_results

    whole = json.loads((ROOT / "docs/real/rlvr/results.json").read_text())
    seeds = whole["ablation"]["seeds"]
    parts = [_one_seed_of(whole, seed) for seed in seeds]
    parts[-1]["start_checksum"] = "converted-again"
    merged = merge_reports(parts, "merged")
    assert json.dumps(merged["arms"], sort_keys=True) == json.dumps(whole["arms"], sort_keys=True)
    assert merged["ablation"]["seeds"] == seeds and merged["merged_from"][-1]["start_checksum"] == "converted-again"
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(part))
    merge_results([str(p) for p in paths], tmp_path / "out")
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Merged from the results of these commands" in table and f"all seed {seeds[-1]}" in table
    rows = [line for line in results_markdown(whole).splitlines() if line.startswith("| all |")]
    assert rows and all(row in table for row in rows)
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["training"].update(learning_rate=1e-3), "differs in training.learning_rate"),
        (lambda r: r["ablation"].update(lora_r=8), "differs in lora_r"),
        (lambda r: r["start"].update(accuracy={**r["start"]["accuracy"], "greedy": 0.5}), "another start model"),
        (lambda r: r["arm_fields"]["top"].update(forking_ratio=0.5), "arm 'top' has fields"),
        (lambda r: r["arms"]["all"]["runs"][0].update(seed=0), r"arm 'all' seed\(s\) \[0\] are in an earlier"),
    ],
    ids=["training", "experiment", "start", "arm", "seed-twice"],
)
def test_reports_of_other_experiments_are_not_merged(change, message):
    import copy

    from forking_trl.ablation import merge_reports

    whole = json.loads((ROOT / "docs/real/rlvr/results.json").read_text())
    first, second = _one_seed_of(whole, 0), copy.deepcopy(_one_seed_of(whole, 1))
    change(second)
    with pytest.raises(ValueError, match=message):
        merge_reports([first, second], "merged")
    with pytest.raises(ValueError, match="at least 2 reports"):
        merge_reports([first], "merged")


def test_the_merge_command_names_a_bad_file(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    from ablation import main

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["merge", "--output_dir", str(tmp_path / "out"), str(tmp_path / "bad.json"), str(tmp_path / "x.json")])
    assert "bad.json: not a readable results.json" in capsys.readouterr().err
