"""Fault injection for the tests: run run_em.py and act right after the manifest records stage NAME.

    python tests/tools/at_stage.py kill NAME [run_em.py flags ...]      # SIGKILL (outputs and record durable)
    python tests/tools/at_stage.py sleep:S NAME [run_em.py flags ...]   # hold the run (and its lock) S seconds

It lives with the tests so that no production code reads a fault-injection switch.
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import run_em  # noqa: E402
from mt import dist  # noqa: E402
from mt.manifest import Manifest  # noqa: E402

action, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
record = Manifest.record


def record_then_act(self, stage, *args, **kwargs):
    record(self, stage, *args, **kwargs)
    if stage == name:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print(f"holding after {name}", flush=True)
        time.sleep(float(action.split(":")[1]))


Manifest.record = record_then_act
dist.run(lambda: run_em.main(argv))
