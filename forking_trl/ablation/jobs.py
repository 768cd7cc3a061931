"""The runs of an experiment as jobs, through submitit: its local executor (subprocesses on this machine, one GPU each
where there are GPUs), Slurm (one array job per experiment), or the debug executor (in this process).

- Resume: a run whose `result.json` was written for the same run specification (`spec_key`: its settings as parsed
  from its command line and the recipe, its threads and processes, and the start model's checksum) is not trained
  again; `--rerun true` trains every run.
- Failures isolated: a failed run is reported with the end of its log, the others go on; the caller writes the
  results of those that finished and names the others.
- Ctrl-C, or a SIGTERM to this command (`kill`, a scheduler stopping it), cancels the jobs this command started
  (a local job's whole process tree); a local job also ends by itself once this command is gone, however it went
  (`end_with_runner`).
- Progress: a line per finished run, and an estimate of the time left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .processes import end_tree

LAUNCHERS = ("local", "slurm", "debug")
POLL_S = 1.0


def spec_key(spec: dict) -> str:
    """What a run's result depends on, hashed: its settings as parsed (`identity`: every training field and the
    experiment fields a run reads, so an edited recipe file counts, another arm's change does not), its threads and
    processes, and the start model (by checksum, not path)."""
    identity = {k: spec[k] for k in ("identity", "threads", "processes", "start_checksum")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def cached_result(spec: dict) -> dict | None:
    """The run's result if `result.json` was written for this very specification, else None."""
    path = Path(spec["output_dir"]) / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("spec_key") == spec_key(spec) else None


def gpu_slots(num_gpus: int, per_run: int) -> list[tuple[int, ...]]:
    """The GPU sets runs are placed on: `num_gpus // per_run` disjoint sets of `per_run` GPUs (none without GPUs)."""
    if num_gpus <= 0:
        return []
    if per_run > num_gpus:
        raise ValueError(f"processes_per_run={per_run} needs as many GPUs; this machine has {num_gpus}.")
    return [tuple(range(i * per_run, (i + 1) * per_run)) for i in range(num_gpus // per_run)]


def least_busy(slots: list[tuple[int, ...]], busy: dict[tuple[int, ...], int]) -> tuple[int, ...]:
    """The slot with the fewest running jobs (the lowest first on a tie): round-robin that never stacks two runs on
    one GPU while another is free."""
    return min(slots, key=lambda slot: (busy.get(slot, 0), slots.index(slot)))


def device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class Finished:
    spec: dict
    result: dict | None  # None: failed
    error: str = ""
    log: str = ""
    seconds: float = 0.0
    cached: bool = False  # its result was there from an earlier command (resume): not trained now


def make_executor(ab, folder: Path):
    """The submitit executor of `ab.launcher`, its parameters set (Slurm: the resources of one run)."""
    import submitit

    if ab.launcher == "debug":
        return submitit.DebugExecutor(folder=folder)
    if ab.launcher == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=ab.job_timeout_min)
        return executor
    executor = submitit.SlurmExecutor(folder=folder)
    additional = dict(ab.slurm_additional or {})
    executor.update_parameters(
        job_name=ab.slurm_job_name,
        time=ab.job_timeout_min,
        nodes=1,
        ntasks_per_node=1,  # one task: a run on several GPUs starts its processes with accelerate launch
        cpus_per_task=ab.slurm_cpus_per_run,
        gpus_per_node=ab.slurm_gpus_per_run if ab.slurm_gpus_per_run is not None else ab.processes_per_run,
        array_parallelism=ab.parallel,
        **({"partition": ab.slurm_partition} if ab.slurm_partition else {}),
        **({"mem": f"{ab.slurm_mem_gb}GB"} if ab.slurm_mem_gb else {}),
        **({"additional_parameters": additional} if additional else {}),
    )
    return executor


def submit_slurm(executor, job_fn, specs: list[dict]) -> list:
    """All runs as one array job (submitit's batch)."""
    with executor.batch():
        jobs = [executor.submit(job_fn, spec) for spec in specs]
    return jobs


def run_jobs(specs: list[dict], ab, out: Path, job_fn, report) -> list[Finished]:
    """Run `specs` (those without a cached result) as jobs of `ab.launcher`; `report(finished, done, total,
    eta_s)` after each. Returns every run's outcome, cached ones included, in the order of `specs`."""
    outcomes: dict[int, Finished] = {}
    todo = []
    for i, spec in enumerate(specs):
        result = None if ab.rerun else cached_result(spec)
        if result is not None:
            outcomes[i] = Finished(spec, result, cached=True)
        else:
            todo.append(i)
    if len(todo) < len(specs):
        print(
            f"resume: {len(specs) - len(todo)} of {len(specs)} runs already have a result for the same specification "
            f"(skipped; --rerun true trains them again); training {len(todo)}",
            flush=True,
        )
    if not todo:
        return [outcomes[i] for i in range(len(specs))]
    folder = out / "jobs"
    executor = make_executor(ab, folder)
    started: dict[int, float] = {}
    durations: list[float] = []
    running: dict[int, object] = {}

    def eta() -> float | None:
        if not durations:
            return None
        left = len(todo) - len(durations)
        return sum(durations) / len(durations) * -(-left // max(1, ab.parallel))

    def finish(i: int, job) -> None:
        seconds = time.time() - started[i]
        error, log = "", ""
        try:
            exception = job.exception()
        except Exception as err:  # noqa: BLE001 - a job whose state cannot be read counts as failed
            exception = err
        if exception is None:
            result = job.result()
        else:
            result, error, log = None, f"{type(exception).__name__}: {exception}", _log_tail(job)
        durations.append(seconds)
        outcomes[i] = Finished(specs[i], result, error, log, seconds)
        report(outcomes[i], len(durations), len(todo), eta())

    try:
        runner = {RUNNER_ENV: runner_identity()} if ab.launcher == "local" else {}  # local jobs end with this command
        with _terminate_as_interrupt(), environment(runner):
            if ab.launcher == "slurm":
                jobs = submit_slurm(executor, job_fn, [specs[i] for i in todo])
                for i, job in zip(todo, jobs, strict=True):
                    started[i], running[i] = time.time(), job
                print(f"slurm: submitted array job {jobs[0].job_id.split('_')[0]} with {len(jobs)} runs", flush=True)
            queue = [] if ab.launcher == "slurm" else list(todo)
            slots = gpu_slots(device_count(), ab.processes_per_run) if ab.launcher == "local" else []
            placed: dict[int, tuple[int, ...]] = {}
            while queue or running:
                while queue and len(running) < ab.parallel:
                    i = queue.pop(0)
                    if slots:  # one GPU set each, the least busy (CUDA_VISIBLE_DEVICES of the job)
                        busy: dict[tuple[int, ...], int] = {}
                        for j in running:
                            busy[placed[j]] = busy.get(placed[j], 0) + 1
                        placed[i] = least_busy(slots, busy)
                        executor.update_parameters(gpus_per_node=len(placed[i]), visible_gpus=placed[i])
                    started[i] = time.time()
                    if ab.launcher == "local":
                        running[i] = executor.submit(_local_job, job_fn, specs[i])
                    else:
                        running[i] = executor.submit(job_fn, specs[i])
                    if ab.launcher == "debug":  # in this process: it runs when asked for its outcome
                        finish(i, running.pop(i))
                for i, job in list(running.items()):
                    if job.done():
                        finish(i, running.pop(i))
                if running:
                    time.sleep(POLL_S)
    except KeyboardInterrupt:
        for job in running.values():
            cancel(job, ab.launcher)
        print(f"\ninterrupted: cancelled {len(running)} running job(s) this command started", flush=True)
        raise
    return [outcomes[i] for i in range(len(specs))]


def cancel(job, launcher: str) -> None:
    """Cancel a running job. A local job's process tree (submitit's controller, the task, what the task started) is
    ended here, SIGTERM then SIGKILL: submitit's own cancel is a SIGINT to the controller, which a process started in
    the background (`cmd &`, nohup, a non-interactive shell) ignores, so the job trained on as an orphan."""
    try:
        job.cancel(check=False)
    except Exception:  # noqa: BLE001 - cancel what can be cancelled
        pass
    if launcher == "local" and str(getattr(job, "job_id", "")).isdigit():  # a local job's id is its controller's pid
        end_tree(int(job.job_id))


RUNNER_ENV = "FORKING_TRL_RUNNER"  # "pid:start" of the command whose local jobs these are (`runner_identity`)


def _started(pid: int) -> str:
    """When process `pid` started, in a form that never changes while it runs: on Linux its start in clock ticks
    since boot (/proc/PID/stat, field 22); elsewhere psutil's create_time. psutil's create_time on Linux adds the boot
    time, read anew from the wall clock each call, so a clock step moves it: a live process would look another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return repr(psutil.Process(pid).create_time())


def runner_identity() -> str:
    """This process as `RUNNER_ENV` names it (the start tells a reused pid from this process)."""
    return f"{os.getpid()}:{_started(os.getpid())}"


def runner_alive(identity: str) -> bool:
    """Whether the process `identity` (`runner_identity`) still runs."""
    pid, started = identity.split(":", 1)
    try:
        return _started(int(pid)) == started
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _local_job(job_fn, spec: dict):
    """A local job: `job_fn(spec)`, ended with the command that submitted it, however that command ended."""
    end_with_runner()
    return job_fn(spec)


def end_with_runner(poll_s: float = 1.0) -> bool:
    """In a local job: end this process, and what it started, once the command that submitted it is gone (however
    it went: SIGKILL leaves no chance to cancel). A daemon thread polls every `poll_s`; False where there is no
    runner to watch (`RUNNER_ENV` unset: a Slurm job, the debug launcher, a direct call)."""
    identity = os.environ.get(RUNNER_ENV)
    if not identity or ":" not in identity:
        return False

    def watch():
        while runner_alive(identity):
            time.sleep(poll_s)
        for child in psutil.Process().children(recursive=True):
            end_tree(child.pid)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-runner", daemon=True).start()
    return True


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """`os.environ` with `values` inside the block (the jobs submitted there inherit it), restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Inside the block a SIGTERM is a `KeyboardInterrupt` (in the main thread), so that `kill` cancels the jobs as
    Ctrl-C does; a killed command would leave its local jobs training as orphans."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_tail(job, chars: int = 3000) -> str:
    """The end of the job's logs (stderr, then stdout), for the failure report."""
    parts = []
    for name in ("stderr", "stdout"):
        try:
            text = getattr(job, name)() or ""
        except Exception:  # noqa: BLE001 - a log that cannot be read is left out
            text = ""
        if text.strip():
            parts.append(f"--- {name} ---\n{text[-chars:]}")
    return "\n".join(parts)


def job_environment(threads: int) -> dict[str, str]:
    """What every run's process gets in its environment (set in the parent before submitting: jobs inherit it)."""
    return {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),  # offline unless the caller says otherwise
    }
