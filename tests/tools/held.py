"""Fault injection for the concurrent-writer tests: run SCRIPT and, right after it takes its first
directory lock (mt/manifest.py lock_run_dir), hold it until the file RELEASE exists (or 300 s pass).

    python tests/tools/held.py RELEASE SCRIPT [its flags ...]     # prints "holding DIR" once held

It lives with the tests so that no production code reads a fault-injection switch.
"""
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mt import manifest  # noqa: E402

release, script, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
lock = manifest.lock_run_dir
held = []


def lock_then_hold(run_dir, *args, **kwargs):
    lock(run_dir, *args, **kwargs)
    if not held:
        held.append(run_dir)
        print(f"holding {run_dir}", flush=True)
        deadline = time.time() + 300
        while not release.exists() and time.time() < deadline:
            time.sleep(0.02)


manifest.lock_run_dir = lock_then_hold  # hold_run_dir and `from mt.manifest import` both see it
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
