"""A run's job as the runner makes it: `processes.launch` of `accelerate launch` with 2 CPU workers (sleep_worker.py),
marked by the folder given; prints its pid and waits."""

import os
import sys
from pathlib import Path

from forking_trl.ablation.processes import launch

folder = sys.argv[1]
worker = Path(__file__).with_name("sleep_worker.py")
command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), folder]
launch(command, {**os.environ, "ACCELERATE_USE_CPU": "true"}, marker=folder)
