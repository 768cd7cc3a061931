"""A run on several processes ends whole with its job: cancelled as submitit cancels (SIGINT, SIGKILL a second later),
killed, or stopped by SIGTERM; and a resumed run never overlaps a stale one. Real `accelerate launch` trees."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from forking_trl.ablation.processes import end_stale, end_tree

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "scripts" / "launch_job.py"


def start_job(folder: Path) -> tuple[subprocess.Popen, list[int]]:
    """A job running a 2-worker launch; returns it and its workers' pids once both are up."""
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, str(JOB), str(folder)], env=env, start_new_session=True)
    deadline = time.time() + 120
    while len(list(folder.glob("worker-*"))) < 2:
        assert job.poll() is None, "the job ended before its workers started"
        assert time.time() < deadline, "the workers did not start within 120 s"
        time.sleep(0.2)
    return job, [int(p.name.split("-")[1]) for p in folder.glob("worker-*")]


def tree(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def gone(pids: list[int], within_s: float = 10.0) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def cleanup():
    started = []
    yield started
    for pid in started:  # whatever a failing test left
        end_tree(pid)


def cancel_as_submitit(job):
    job.send_signal(signal.SIGINT)
    try:
        job.wait(1.0)
    except subprocess.TimeoutExpired:
        job.kill()
    job.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop",
    [cancel_as_submitit, lambda job: job.kill(), lambda job: job.terminate()],
    ids=["cancel", "sigkill", "sigterm"],
)
def test_every_process_of_a_launched_run_ends_with_its_job(tmp_path, cleanup, stop):
    # the bug: subprocess.run ended only the launcher; torch starts each worker in a session of its own, so both
    # workers trained on after a cancel
    job, workers = start_job(tmp_path / "run")
    everything = [job.pid, *tree(job.pid)]
    cleanup.extend(everything)
    assert set(workers) <= set(everything)
    stop(job)
    job.wait(10)
    assert gone(everything), [p for p in everything if psutil.pid_exists(p)]


@pytest.mark.slow
def test_a_resumed_run_ends_the_stale_processes_of_its_earlier_try(tmp_path, cleanup):
    folder = tmp_path / "run"
    job, workers = start_job(folder)
    cleanup.extend([job.pid, *tree(job.pid)])
    ended = end_stale(str(folder))  # what launch() does first
    assert set(workers) <= set(ended) and gone([job.pid, *workers])
    assert end_stale(str(folder)) == []
    assert os.getpid() not in ended  # its own command line may name the folder too; never itself


RUNNER = ROOT / "tests" / "scripts" / "local_runner.py"


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_local_jobs_end_with_a_runner_started_in_the_background(tmp_path, cleanup, stop):
    """The runner's local jobs trained on as orphans after `kill <runner>` when the runner had been started in the
    background (`cmd &`, nohup, a non-interactive shell): such a process ignores SIGINT, and submitit's cancel is a
    SIGINT to its controller. And a SIGKILL to the runner left them whatever its start. Now a cancelled local job's
    tree is ended here, and a local job ends by itself once its runner is gone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def in_the_background():  # what `&` in a non-interactive shell does to the command
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    runner = subprocess.Popen(
        [sys.executable, str(RUNNER), str(tmp_path)], env=env, preexec_fn=in_the_background, start_new_session=True
    )
    cleanup.append(runner.pid)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("r*/pids-*"))) < 2:
        assert runner.poll() is None, "the runner ended before its jobs started"
        assert time.time() < deadline, "the jobs did not start within 120 s"
        time.sleep(0.2)
    pids = tree(runner.pid)  # submitit's controllers, the jobs, their children
    jobs = [int(n) for p in tmp_path.glob("r*/pids-*") for n in p.name.split("-")[1:]]
    assert set(jobs) <= set(pids) and len(pids) >= 6
    runner.send_signal(stop)
    runner.wait(30)
    assert gone(pids), [psutil.Process(p).cmdline() for p in pids if psutil.pid_exists(p)]


def test_a_wall_clock_step_does_not_end_the_local_jobs(monkeypatch):
    """A local job ends itself once its runner is gone, and must not before. The runner was named by its pid and
    psutil's create_time, which adds the boot time read anew from the wall clock: a clock step (a VM's time sync,
    2026-12-07) made a live runner look gone, and two jobs of a real-model run killed themselves mid-training."""
    import psutil._pslinux as pslinux

    from forking_trl.ablation.jobs import runner_alive, runner_identity

    identity = runner_identity()
    assert runner_alive(identity)
    booted = pslinux.boot_time()
    monkeypatch.setattr(pslinux, "boot_time", lambda: booted + 3600.0)  # the wall clock stepped an hour
    assert runner_alive(identity)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert not runner_alive(f"{ended.pid}:{identity.split(':', 1)[1]}")  # a runner that is gone
    assert not runner_alive(f"{os.getpid()}:1")  # another process under this pid (another start)
