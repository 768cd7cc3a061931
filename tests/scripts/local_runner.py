"""A command that runs two local jobs through `forking_trl.ablation.jobs.run_jobs`, as the experiment runner does;
each job starts a child, writes `pids-<job>-<child>` and sleeps. For tests/test_processes.py."""

import sys
from pathlib import Path
from types import SimpleNamespace

from forking_trl.ablation.jobs import run_jobs


def job(spec):  # pickled by value (cloudpickle: defined in __main__), so the job imports nothing of the tests
    import os
    import pathlib
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    folder = pathlib.Path(spec["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"pids-{os.getpid()}-{child.pid}").touch()
    time.sleep(600)


folder = Path(sys.argv[1])
ab = SimpleNamespace(launcher="local", rerun=True, parallel=2, processes_per_run=1, job_timeout_min=10)
specs = [{"arm": f"a{i}", "seed": 0, "output_dir": str(folder / f"r{i}")} for i in range(2)]
run_jobs(specs, ab, folder, job, lambda *args: None)
