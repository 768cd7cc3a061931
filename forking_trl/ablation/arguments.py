"""The experiment's arguments: what it compares (named arms, seeds), how it measures, where its jobs run; and the
command line of each run, validated before anything trains."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import LAUNCHERS

# the built-in arms: the fields each sets on top of ARM_BASE (`random` keeps as many tokens as `top`)
ARM_BASE = {"forking_mode": "all", "forking_ratio": 1.0, "entropy_method": "none"}
ARMS = {
    "all": {},
    "top": {"forking_mode": "top", "forking_ratio": 0.2},
    "bottom": {"forking_mode": "bottom", "forking_ratio": 0.8},
    "random": {"forking_mode": "random", "forking_ratio": 0.2},
    "clip_cov": {"entropy_method": "clip_cov"},  # at the method's defaults (ForkingGRPOConfig), on all tokens
    "kl_cov": {"entropy_method": "kl_cov"},
    "entropy_adv": {"entropy_method": "entropy_adv"},
}
PAPER_ARMS = ["all", "top", "bottom", "random"]
TRACKED = (
    *("reward", "step_time", "entropy", "entropy/p50", "entropy/p80", "entropy/p95", "entropy/share_below_0.01"),
    "forking/ratio",
    *("cov/mean", "cov/kept", "clip_cov/clipped_fraction", "kl_cov/penalized_fraction", "kl_cov/penalty"),
    *("entropy_adv/shaping", "entropy_adv/capped_fraction"),
    *("branching/forks_per_root", "branching/generated_tokens_ratio", "branching/changed_outcome"),
    *("branching/distinct_answers", "branching/fresh_samples"),
)


COUNTDOWN_FIELDS = (
    *("countdown_num_count", "countdown_low", "countdown_high", "countdown_target_low", "countdown_target_high"),
    *("countdown_operations", "countdown_min_solutions"),
)


@dataclass
class AblationArguments:
    """What the ablation compares and how it measures; the GRPO settings are the `ForkingGRPOConfig` fields."""

    arms: list[str] = field(
        default_factory=lambda: list(PAPER_ARMS),
        metadata={
            "help": f"Arms to train: built in, {', '.join(ARMS)} (all: every token; top 0.2; bottom 0.8; random "
            "0.2; an entropy method on all tokens at its defaults), or any named in arm_configs."
        },
    )
    arm_configs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Arms of this recipe: {name: {field: value}} with forking_trl's fields (forking_*, "
            "entropy_method, clip_cov_*, kl_cov_*, entropy_adv_*), as YAML or JSON. Unset forking_mode, "
            "forking_ratio and entropy_method are all, 1.0 and none; a built-in name is redefined."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "GRPO seeds of every arm."})
    task: str = field(
        default="chain",
        metadata={
            "help": "The task (forking_trl.tasks): 'chain' (synthetic two-step +/- arithmetic with a worked chain, "
            "one valid path per problem), 'arithmetic' (one +/- operation), 'countdown' (reach a target from given numbers: several solutions per "
            "problem, coverage measured; its ranges are the countdown_* fields), or a math dataset for "
            "forking_trl.data.load_math_dataset (bundled name or file)."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out set for a dataset task (bundled name or file); generated tasks make their own."},
    )
    num_train: int = field(
        default=20000, metadata={"help": "Training problems (generated tasks; a cap for a dataset)."}
    )
    num_eval: int = field(default=200, metadata={"help": "Held-out problems (never in the training set)."})
    eval_k: int = field(default=4, metadata={"help": "Samples per held-out problem for sampled avg@k (T = 1)."})
    pass_k: int = field(
        default=0,
        metadata={
            "help": "Samples per held-out problem for pass@k at T = 1, reported for k = 1, 2, 4, ..., pass_k "
            "(unbiased estimator, Chen et al. 2021); 0: off."
        },
    )
    pass_k_problems: int = field(
        default=0, metadata={"help": "Held-out problems pass@k is measured on (the first ones); 0: all num_eval."}
    )
    eval_max_new_tokens: int = field(default=40, metadata={"help": "Completion length at evaluation."})
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generate call at evaluation."})
    max_operand: int = field(default=20, metadata={"help": "Chain and arithmetic tasks: operands from 0 to this."})
    task_instruction: str = field(
        default="",
        metadata={
            "help": "Chain and arithmetic tasks: a sentence after each question, e.g. 'Answer with just the number.' "
            "for a pretrained instruct model (start_model) that would otherwise answer at length; empty: none."
        },
    )
    countdown_num_count: int = field(default=3, metadata={"help": "Countdown: numbers per problem (2 to 5)."})
    countdown_low: int = field(default=1, metadata={"help": "Countdown: smallest number."})
    countdown_high: int = field(default=9, metadata={"help": "Countdown: largest number."})
    countdown_target_low: int = field(default=1, metadata={"help": "Countdown: smallest target."})
    countdown_target_high: int = field(default=99, metadata={"help": "Countdown: largest target."})
    countdown_operations: str = field(
        default="+-*", metadata={"help": "Countdown: the allowed operations, a subset of '+-*/'."}
    )
    countdown_min_solutions: int = field(
        default=1,
        metadata={"help": "Countdown: only problems with at least this many solutions (up to commutativity)."},
    )
    start_model: str | None = field(
        default=None,
        metadata={"help": "Start model path or Hub id; None builds the tiny Qwen3 and warm-starts it on the task."},
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny start model: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Tiny start model: layers."})
    sft_steps: int = field(default=800, metadata={"help": "Tiny start model: supervised warm-start steps."})
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "Tiny start model: warm-start learning rate."})
    sft_batch_size: int = field(default=32, metadata={"help": "Tiny start model: warm-start batch size."})
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank of every run (peft; the adapter is merged into the model that is measured); 0: full "
            "fine-tuning. For a pretrained start_model on a small machine."
        },
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA: alpha (scale alpha / r); only with lora_r."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "LoRA: the modules adapted, 'all-linear' or comma-separated names; only with lora_r."},
    )
    bundled_start_model: bool = field(
        default=True,
        metadata={
            "help": "Tiny start model: when the start settings are those of the start model shipped with forking_trl "
            "(the CPU recipes'), copy it instead of warming one up: the same weights on every machine. False: build "
            "it here (bit-identical to the shipped one on the machine that built it; another CPU's kernels may "
            "differ in the last bits, and 800 steps make that another model)."
        },
    )
    parallel: int = field(
        default=2, metadata={"help": "Runs trained at the same time (local: jobs at once; slurm: the array's limit)."}
    )
    threads_per_run: int = field(default=1, metadata={"help": "torch threads of each run's process."})
    launcher: str = field(
        default="local",
        metadata={
            "help": "Where the runs go, through submitit: 'local' (subprocesses here, parallel at a time, one GPU set "
            "each where there are GPUs), 'slurm' (one array job), 'debug' (in this process, for tests and debuggers).",
            "choices": list(LAUNCHERS),
        },
    )
    rerun: bool = field(
        default=False,
        metadata={
            "help": "Train every run again; by default a run with a result for the same specification is skipped."
        },
    )
    processes_per_run: int = field(
        default=1,
        metadata={
            "help": "Processes (GPUs) of each run; above 1 the run goes through accelerate launch inside its job, with "
            "accelerate_config."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate config of a run on several processes (e.g. accelerate_configs/zero3.yaml)."},
    )
    job_timeout_min: int = field(
        default=7 * 24 * 60, metadata={"help": "Time limit of each job in minutes (local and slurm)."}
    )
    slurm_partition: str | None = field(default=None, metadata={"help": "Slurm: partition of the jobs."})
    slurm_gpus_per_run: int | None = field(
        default=None, metadata={"help": "Slurm: GPUs of each run's job; None: processes_per_run."}
    )
    slurm_cpus_per_run: int | None = field(
        default=None, metadata={"help": "Slurm: CPUs of each run's job; None: threads_per_run."}
    )
    slurm_mem_gb: int | None = field(default=None, metadata={"help": "Slurm: memory of each run's job, GB."})
    slurm_job_name: str = field(default="forking-trl", metadata={"help": "Slurm: the array job's name."})
    slurm_additional: dict | str | None = field(
        default=None,
        metadata={
            "help": "Slurm: further sbatch options {option: value} (e.g. {account: my-lab, qos: high}), as YAML or "
            "JSON on the command line."
        },
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "Every stage on a small setting (a minute or two on 2 CPU cores): a smoke test. It starts from the "
            "shipped start model when the recipe's settings have one, else from a 60-step warm start."
        },
    )

    def __post_init__(self):
        from ..forking_config import OWN_FIELD_PREFIXES

        if isinstance(self.arm_configs, str):
            try:
                self.arm_configs = json.loads(self.arm_configs)
            except json.JSONDecodeError as err:
                raise ValueError(f"arm_configs must be a mapping (YAML, or JSON on the command line): {err}") from err
        configs = self.arm_configs or {}
        if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
            raise ValueError(f"arm_configs must map arm names to {{field: value}} mappings; got {configs!r}.")
        for name, overrides in configs.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
                raise ValueError(f"arm_configs: arm name {name!r} must be letters, digits, '_', '.' or '-'.")
            bad = [k for k in overrides if not str(k).startswith(OWN_FIELD_PREFIXES)]
            if bad:
                raise ValueError(
                    f"arm_configs[{name!r}]: {', '.join(map(repr, bad))} not an arm field; arms differ only in "
                    f"forking_trl's own fields ({', '.join(p + '*' for p in OWN_FIELD_PREFIXES)})."
                )
        known = [*ARMS, *(n for n in configs if n not in ARMS)]
        unknown = [a for a in self.arms if a not in known]
        if unknown or not self.arms:
            raise ValueError(f"arms must be a non-empty list of {', '.join(known)}; got {self.arms!r}.")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must not repeat a name; got {self.arms!r}.")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed.")
        positive = ("num_train", "num_eval", "eval_k", "eval_max_new_tokens", "parallel", "threads_per_run")
        for name in (*positive, "processes_per_run", "job_timeout_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}.")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(map(repr, LAUNCHERS))}; got {self.launcher!r}.")
        for name in ("slurm_gpus_per_run", "slurm_cpus_per_run", "slurm_mem_gb"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 or None; got {value!r}.")
        if isinstance(self.slurm_additional, str):
            try:
                self.slurm_additional = json.loads(self.slurm_additional)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"slurm_additional must be a mapping (YAML, or JSON on the command line): {err}"
                ) from err
        if self.slurm_additional is not None and not isinstance(self.slurm_additional, dict):
            raise ValueError(f"slurm_additional must map sbatch options to values; got {self.slurm_additional!r}.")
        if self.slurm_cpus_per_run is None:
            self.slurm_cpus_per_run = self.threads_per_run
        if self.accelerate_config is not None and not Path(self.accelerate_config).is_file():
            raise ValueError(f"accelerate_config={self.accelerate_config!r} is not a file.")
        for name in ("pass_k", "pass_k_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}.")
        from ..tasks import GENERATED

        if self.task_instruction and self.task not in ("chain", "arithmetic"):
            raise ValueError(f"task_instruction is for the chain and arithmetic tasks; task={self.task!r} has none.")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0: full fine-tuning); got {self.lora_r!r}.")
        lora_set = [n for n in ("lora_alpha", "lora_target_modules") if getattr(self, n) != _DEFAULTS[n]]
        if lora_set and not self.lora_r:
            raise ValueError(
                f"{', '.join(lora_set)} set without lora_r: LoRA is off (lora_r=0); set lora_r or remove them."
            )
        if self.lora_r and self.processes_per_run > 1 and _zero_stage(self.accelerate_config) == 3:
            raise ValueError(
                "lora_r with a ZeRO-3 accelerate_config: the adapter is merged into the measured model on the main "
                "process, which ZeRO-3's sharded weights do not allow; use lora_r=0 or a non-ZeRO-3 config."
            )
        if self.task not in GENERATED and self.eval_dataset is None:
            raise ValueError(f"task={self.task!r} needs eval_dataset (a bundled name or file held out from it).")
        self.make_task()  # a bad countdown_* range is a ValueError naming it, here
        if self.quick:  # every stage, small; from the shipped start model where the recipe has one
            shipped = self.bundled_start_model and self.start_model is None
            shipped = shipped and shipped_start_model(start_settings(self))
            if shipped:  # a warm start of 60 steps may solve nothing: no reward, no gradient, nothing tested
                self.start_model = str(shipped)
            self.seeds, self.num_train, self.num_eval, self.eval_k = self.seeds[:1], 2000, 24, 2
            self.sft_steps = min(self.sft_steps, 60)
            self.pass_k, self.pass_k_problems = min(self.pass_k, 4), 8

    def make_task(self):
        """The task (`forking_trl.tasks`) of these arguments."""
        from ..tasks import get_task

        if self.task in ("chain", "arithmetic"):
            return get_task(self.task, max_operand=self.max_operand, instruction=self.task_instruction)
        if self.task == "countdown":
            spec = {name[len("countdown_") :]: getattr(self, name) for name in COUNTDOWN_FIELDS}
            try:
                return get_task("countdown", **spec)
            except ValueError as err:
                raise ValueError(f"countdown_* fields: {err}") from None
        return get_task(self.task, eval_dataset=self.eval_dataset)

    def peft_config(self):
        """The runs' `peft.LoraConfig` (with `lora_r`), else None."""
        if not self.lora_r:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")

    def arm_fields(self, arm: str) -> dict:
        """The forking_trl fields that define `arm` (forking_mode, forking_ratio and entropy_method always)."""
        return {**ARM_BASE, **ARMS.get(arm, {}), **(self.arm_configs or {}).get(arm, {})}


_DEFAULTS = {f.name: f.default for f in AblationArguments.__dataclass_fields__.values()}


def _zero_stage(accelerate_config: str | None) -> int | None:
    """The DeepSpeed ZeRO stage an accelerate config file asks for (None: none)."""
    if accelerate_config is None:
        return None
    import yaml

    config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    stage = (config.get("deepspeed_config") or {}).get("zero_stage")
    return int(stage) if stage is not None else None


# --quick: GRPO flags appended to the command line (flags override the YAML)
QUICK_FLAGS = ["--max_steps", "3", "--per_device_train_batch_size", "16", "--num_generations", "4"]


def make_parser():
    """`TrlParser` over the ablation's arguments and `ForkingGRPOConfig` (`--config recipe.yaml`; flags override)."""
    from trl import TrlParser

    from ..forking_config import ForkingGRPOConfig

    return TrlParser((AblationArguments, ForkingGRPOConfig))


def arm_flags(overrides: dict) -> list[str]:
    """`--field value` for each field set to a value (booleans as true/false); a `None` (YAML/JSON `null`) has no
    flag (the parser would read the string 'None'): it is `unset_fields`' and set after parsing (`parse_run`)."""
    out = []
    for name, value in overrides.items():
        if value is not None:
            out += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def unset_fields(overrides: dict) -> list[str]:
    """The fields an arm sets to `None` (`null`)."""
    return [name for name, value in overrides.items() if value is None]


def parse_run(flags: list[str], unset: list[str] = ()):
    """(AblationArguments, ForkingGRPOConfig) of one run's command line, with the `unset` fields set to None and the
    config validated again: how every run and `check_arms` read an arm."""
    ab, args = make_parser().parse_args_and_config(flags)
    for name in unset:
        setattr(args, name, None)
    if unset:
        args.validate()
    return ab, args


def run_flags(
    argv: list[str], quick: bool, arm: str, seed: int, output_dir: Path, overrides: dict | None = None
) -> list[str]:
    """The command line of one run: the experiment's, then what differs between runs (flags override the YAML):
    the arm's fields (`overrides`, by default the built-in arm's), the seed and the directory."""
    overrides = {**ARM_BASE, **ARMS[arm]} if overrides is None else overrides
    return [
        *argv,
        *(QUICK_FLAGS if quick else []),
        *arm_flags(overrides),
        *("--seed", str(seed)),
        *("--output_dir", str(output_dir), "--save_strategy", "no", "--report_to", "none"),
        *("--disable_tqdm", "true", "--forking_log_top_tokens", "0"),
    ]


def check_arms(ab: AblationArguments, argv: list[str], out: Path) -> None:
    """Parse every arm's command line as its run will (`ForkingGRPOConfig` validates it); `ValueError` naming the arm
    and its fields otherwise."""
    import contextlib
    import io

    reward_names = ab.make_task().reward_names
    for arm in ab.arms:
        overrides = ab.arm_fields(arm)
        flags = run_flags(argv, ab.quick, arm, 0, out / "runs" / f"{arm}-check", overrides)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                _, args = parse_run(flags, unset_fields(overrides))
            _check_arm_fields(args, overrides, reward_names)
        except (ValueError, SystemExit) as err:
            reason = stderr.getvalue().strip().splitlines()[-1:] or [str(err)]
            raise ValueError(f"arm {arm!r} {overrides} is not a valid configuration: {reason[0]}") from None
        if args.entropy_method == "kl_cov" and args.fully_on_policy():
            print(
                f"note: arm {arm!r} is KL-Cov on a fully on-policy recipe ({args.on_policy_reason()}): its penalty is "
                "0, so it trains as all tokens on the unclipped surrogate (which on-policy equals the clipped one).",
                flush=True,
            )


def _check_arm_fields(args, overrides: dict, reward_names: tuple[str, ...]) -> None:
    """What the config validation cannot see: each field the arm sets arrives with its value, and a
    `dynamic_sampling_reward` names one of the reward functions the runs train with."""
    for name, value in overrides.items():
        got = getattr(args, name)
        same = got == value or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and got == float(value)
        )
        if not same:
            raise ValueError(f"{name}={value!r} arrived as {got!r} through the command line")
    reward = args.dynamic_sampling_reward
    if reward is not None and reward not in reward_names:
        raise ValueError(
            f"dynamic_sampling_reward={reward!r} is not a reward function of the runs: "
            f"{', '.join(map(repr, reward_names))} (or null for the total reward)"
        )


# the tiny start models of the CPU recipes' settings (each with its start-settings.json), built by sft_warm_start on
# this project's machine: shipped so that every machine starts from the same weights (bundled_data/README.md)
BUNDLED_START_MODELS = {
    "chain": Path(__file__).resolve().parents[1] / "bundled_data" / "start_model",
    "countdown": Path(__file__).resolve().parents[1] / "bundled_data" / "start_model_countdown",
}
# what the tiny start model is built from, beside the task's own settings: recorded beside it, and compared when an
# output directory is reused
START_SETTINGS = ("task", "num_train", "tiny_hidden_size", "tiny_num_layers", "sft_steps", "sft_learning_rate")
START_SETTINGS += ("sft_batch_size",)


def start_settings(ab: AblationArguments) -> dict:
    """What the tiny start model of `ab` is built from: `START_SETTINGS` and the task's settings."""
    return {**{name: getattr(ab, name) for name in START_SETTINGS}, **ab.make_task().settings()}


def shipped_start_model(settings: dict) -> Path | None:
    """The shipped start model made with exactly `settings`, if there is one."""
    for path in BUNDLED_START_MODELS.values():
        record = path / "start-settings.json"
        if record.exists() and json.loads(record.read_text()) == settings:
            return path
    return None
