"""Kill soak: random SIGKILLs over a run_em.py run, each trial resumed to the end and compared with
an uninterrupted run of the same command (issue 15).

    python eval/soak.py --trials 10 --kills 3 --out runs/soak          # the default sandbox run
    python eval/soak.py --trials 4 --args "--preset tiny --policy P --rm R --prompts F"

A trial starts the run, SIGKILLs it after a random delay (up to `--kills` times, each delay uniform
over the uninterrupted run's wall time), then reruns the same command until it finishes. Its
artifacts must equal the reference's; the fields that hold wall-clock times or process ids are set
aside, by name: TIMING_KEYS in JSON files, and the files in TIMING_FILES (manifest.json also holds
hashes of files that contain those times).
"""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python eval/soak.py`: make `mt` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mt import dist  # noqa: E402
from mt.flags import opt, parse  # noqa: E402
from mt.manifest import lock_run_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"elapsed", "seconds", "tokens_per_s"}
TIMING_FILES = {"manifest.json", ".lock"}


@dataclass
class SoakArgs:
    """python eval/soak.py: random SIGKILLs over a run, every trial resumed and compared."""
    trials: int = opt(10, above=0)  # runs to interrupt
    kills: int = opt(3, above=0)  # at most this many SIGKILLs per trial (1 to kills, drawn)
    seed: int = 0  # draws the kill times
    args: str = ""  # run_em.py flags (default: the sandbox run); --out is added per run
    out: str = "runs/soak"  # the reference run, the trials and soak.json


def _run(flags: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen([sys.executable, str(REPO / "run_em.py"), *flags, "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def artifacts(run: Path) -> dict[str, object]:
    """Every result file of a run, its own path normalised away and timing fields set aside."""
    out = {}
    for f in sorted(run.rglob("*")):
        if not f.is_file() or f.name in TIMING_FILES:
            continue
        data = f.read_bytes().replace(str(run).encode(), b"<RUN>")
        if f.suffix == ".jsonl":
            out[str(f.relative_to(run))] = [_strip(json.loads(x))
                                            for x in data.decode().splitlines() if x]
        elif f.suffix == ".json":
            out[str(f.relative_to(run))] = _strip(json.loads(data))
        else:
            out[str(f.relative_to(run))] = data
    return out


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv, SoakArgs(), "python eval/soak.py", __doc__)
    flags, root = shlex.split(a.args), Path(a.out)
    # a second soak into this folder is refused, naming this one; the run_em.py children write
    # inside it as this process's own (mt/manifest.py ANCESTORS_ENV)
    lock_run_dir(root)
    for p in root.iterdir():  # a fresh soak: an earlier one's runs go, the lock just taken stays
        if p.name != ".lock":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    t0 = time.time()
    assert _run(flags, root / "reference").wait() == 0, (
        "the uninterrupted run failed: fix it before soaking")
    wall = time.time() - t0
    ref = artifacts(root / "reference")
    rng = random.Random(a.seed)
    trials = []
    for i in range(a.trials):
        out, kills, landed = root / f"trial{i}", rng.randint(1, a.kills), []
        for _ in range(kills):
            delay = rng.uniform(0, wall)
            p = _run(flags, out)
            try:
                p.wait(timeout=delay)  # finished before the kill time: nothing left to interrupt
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                landed.append(round(delay, 2))
        reruns = 0
        # resume to the end (a rerun never needs more than one)
        while _run(flags, out).wait() != 0:
            reruns += 1
            if reruns > 3:
                break
        same = artifacts(out) == ref
        trials.append({"trial": i, "kills_at_s": landed, "identical": same,
                       "extra_reruns": reruns})
        print(f"trial {i}: {len(landed)} SIGKILL(s) at {landed} s, resumed: "
              f"{'identical' if same else 'DIFFERENT'}", flush=True)
    n_kills = sum(len(t["kills_at_s"]) for t in trials)
    ok = sum(t["identical"] for t in trials)
    summary = {"trials": a.trials, "sigkills": n_kills, "identical": ok,
               "reference_wall_s": round(wall, 1), "flags": flags,
               "timing_keys": sorted(TIMING_KEYS), "timing_files": sorted(TIMING_FILES),
               "detail": trials}
    (root / "soak.json").write_text(json.dumps(summary, indent=2))
    print(f"{ok}/{a.trials} trials identical to the uninterrupted run ({n_kills} SIGKILLs; "
          f"reference {wall:.0f} s) -> {root / 'soak.json'}")
    return summary


if __name__ == "__main__":
    dist.run(main)  # a user error (its --out in use): one `error: ...` line, exit status 2
