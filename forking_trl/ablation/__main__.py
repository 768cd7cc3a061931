"""One run of an experiment, in this process: `python -m forking_trl.ablation SPEC.json` (what a run on several
processes starts under `accelerate launch`); the main process writes the run's `result.json`. A worker dies with its
launcher (`processes.die_with_parent`): torch starts each in a session of its own, out of reach of its signals."""

import json
import sys
from pathlib import Path

from .processes import die_with_parent
from .runs import run_arm, write_result

if __name__ == "__main__":
    die_with_parent()
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = run_arm(spec)
    if result is not None:
        write_result(spec, result)
