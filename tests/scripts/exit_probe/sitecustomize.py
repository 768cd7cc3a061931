"""Imported at start-up by every Python process that has this folder on PYTHONPATH (tests/test_launch.py).

At exit, each rank of an `accelerate launch` run writes whether its process group was still alive once the script
had returned. One left alive is torn down during interpreter finalization, where gloo can abort the process
(SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489).
"""

import atexit
import json
import os
import sys


def _record():
    folder = os.environ.get("FORKING_EXIT_PROBE_DIR")
    if not folder or "RANK" not in os.environ or "torch" not in sys.modules:
        return
    import torch.distributed as dist

    alive = dist.is_available() and dist.is_initialized()
    with open(os.path.join(folder, f"exit_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"process_group_alive": alive}, f)


atexit.register(_record)
