"""A worker that only waits: it asks to die with its launcher, as `python -m forking_trl.ablation` does, records its
pid in the folder given, and sleeps."""

import os
import sys
import time

from forking_trl.ablation.processes import die_with_parent

die_with_parent()
open(os.path.join(sys.argv[1], f"worker-{os.getpid()}"), "w").close()
time.sleep(600)
