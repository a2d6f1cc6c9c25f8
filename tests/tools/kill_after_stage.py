"""Fault injection for tests/test_run_em.py: run run_em.py, SIGKILL the process right after the manifest
records stage NAME (the worst moment: outputs and record durable, nothing after them started).

    python tests/tools/kill_after_stage.py NAME [run_em.py flags ...]

It lives with the tests so that no production code reads a fault-injection switch.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import run_em  # noqa: E402
from mt import dist  # noqa: E402
from mt.manifest import Manifest  # noqa: E402

name, argv = sys.argv[1], sys.argv[2:]
record = Manifest.record


def record_then_die(self, stage, *args, **kwargs):
    record(self, stage, *args, **kwargs)
    if stage == name:
        os.kill(os.getpid(), signal.SIGKILL)


Manifest.record = record_then_die
dist.run(lambda: run_em.main(argv))
