"""A run on several processes is a tree: the job (a submitit task), its `accelerate launch`, and the workers that
torch's elastic agent starts in sessions of their own. This module makes the tree end with the job, however the job
ends, and never lets two trees of one run overlap.

- `launch(command, env, marker)`: runs the launcher and waits. A SIGINT (submitit's cancel), SIGTERM or a timeout's
  signal to the job ends the whole tree first (SIGTERM, then SIGKILL after a grace), then acts as it would have.
- `die_with_parent()`: the launcher (set before it starts) and each worker (first thing, in `__main__`) are killed by
  the kernel when their parent dies, so a SIGKILL to the job (submitit's second signal, one second after the first)
  takes the tree with it too (Linux; elsewhere only the signals above are handled).
- `end_stale(marker)`: before a run starts, every process still running from an earlier try of the same run (its
  command line names the run's spec file) is ended, so a resumed run never overlaps a stale one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import psutil

GRACE_S = 0.5  # SIGTERM first, then SIGKILL: submitit sends SIGKILL one second after its SIGINT
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`); exits at
    once if the parent is already gone. True where it took effect, False where the platform has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the request: nobody would send the signal
        os._exit(1)
    return True


def end_tree(root: int, grace_s: float = GRACE_S) -> list[int]:
    """End `root` and all its descendants (a worker in a session of its own included): SIGTERM to each, then SIGKILL
    to those alive after `grace_s`. Returns the pids it found. A process that is already gone is skipped."""
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return _end(procs, grace_s)


def end_stale(marker: str, grace_s: float = GRACE_S) -> list[int]:
    """End every process (but this one and its ancestors) whose command line contains `marker` (a run's spec file:
    its launcher's and workers' command lines name it), with their descendants. Returns the pids it ended."""
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    stale = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.pid not in own and any(marker in part for part in cmdline):
            with contextlib.suppress(psutil.Error):
                stale += [proc, *proc.children(recursive=True)]
    return _end(list({p.pid: p for p in stale}.values()), grace_s)


def _end(procs: list, grace_s: float) -> list[int]:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in procs]


def launch(command: list[str], env: dict, marker: str) -> None:
    """Run `command` (a launcher whose command line contains `marker`) and wait for it; `CalledProcessError` if it
    fails. Earlier processes of the same run are ended first (`end_stale`); the launcher dies with this process
    (`die_with_parent`); a SIGINT or SIGTERM to this process ends the launcher's whole tree before it acts."""
    end_stale(marker)
    process = subprocess.Popen(command, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509 - prctl only
    with _ending_tree_on_signals(process.pid):
        code = process.wait()
    if code:
        raise subprocess.CalledProcessError(code, command)


@contextlib.contextmanager
def _ending_tree_on_signals(root: int):
    """Inside the block a SIGINT or SIGTERM first ends `root`'s tree, then does what it did before (a
    `KeyboardInterrupt` for SIGINT, by default). Main thread only (elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum, frame):
        end_tree(root)
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
