"""The one resume system: a run directory's config check and its stage records.

    m = Manifest(out, cfg)            # refuses a rerun whose flags differ, naming the keys
    m.stage("iter1/sample", train_policy.sample, outputs=[it / "samples.jsonl"], policy_dir=pi,
            ...)

A stage is a function called with keyword arguments. `stage` records exactly what it passes: every
Path argument that is not where it writes is an input (hashed), every other argument a parameter (a
config slice as a dict, minus the fields marked scheduling-only in mt/config.py). A rerun skips a
stage whose inputs, parameters and outputs are unchanged, so a dependency cannot be forgotten;
under force_config a stage whose inputs or parameters changed is redone, and through its outputs'
hashes every stage downstream of it.
Used by run_em.py and by the standalone train_policy.py / train_rm.py.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from mt import config as C
from mt import dist, flags
from mt.data import read_json, write_json
from mt.errors import UserError


class RunLockedError(UserError):
    """Another process is running in this run directory."""


# run directory -> its open, locked .lock file (held until the process ends)
_HELD: dict[Path, object] = {}
# the holders ('pid N on HOST') of the processes above this one that hold a directory: a command
# holding its --out (eval/sandbox_report.py) starts run_em.py children into it, which must not
# refuse their own parent. Inherited through the environment; one entry per process, not per dir
ANCESTORS_ENV = "MT_LOCK_HOLDERS"


def _ours(holder: str) -> bool:
    """The holder is this process or one that started it (through the environment)."""
    return holder in os.environ.get(ANCESTORS_ENV, "").split(";")


def held_above(path: Path) -> tuple[Path, str] | None:
    """The nearest directory above `path` that another live process holds, and its holder."""
    for parent in Path(path).resolve().parents:
        holder = None if parent in _HELD else live_holder(parent)
        if holder and not _ours(holder):
            return parent, holder
    return None


def lock_run_dir(run_dir: Path, inside_live_run: bool = False):
    """An advisory lock on run_dir/.lock for this process's lifetime: two writers into one
    directory would corrupt it (and the manifest would certify the result). The OS releases it
    when the process dies, so a SIGKILL never leaves a stale lock. A directory inside one a live
    process holds is refused too, unless inside_live_run; one this process's parent holds (or
    one inside it) is this process's to write."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, and this command writes a directory there. Fix: "
                        "give --out a directory (new or a run's), or move the file away")
    # a stage command into a live run's iteration directory (a plot of a live run may write there)
    above = None if inside_live_run else held_above(run_dir)
    if above:
        raise RunLockedError(f"{run_dir}: lies inside {above[0]}, which is in use by {above[1]}. "
                             "Fix: wait for that run to finish (or stop it), or give this "
                             "command another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if _ours(holder):  # the parent holds it for this child
            _HELD[run_dir] = None
            return
        raise RunLockedError(f"{run_dir}: is in use by {holder}. Fix: wait for that run to finish "
                             "(or stop it), or give this run another --out") from None
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    f.seek(0)
    f.truncate()
    f.write(me + "\n")
    f.flush()
    _HELD[run_dir] = f
    if not _ours(me):
        os.environ[ANCESTORS_ENV] = ";".join(filter(None, [os.environ.get(ANCESTORS_ENV), me]))


def live_holder(run_dir: Path) -> str | None:
    """Who holds run_dir's lock ('pid N on HOST'), or None: a non-blocking shared flock, released
    at once, tells a live holder from a stale .lock file."""
    path = run_dir / ".lock"
    if not path.is_file():
        return None
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def hold_run_dir(run_dir: Path):
    """lock_run_dir on rank 0 for every rank; every rank raises if the directory is taken."""
    err = None
    if dist.get().is_main:
        try:
            lock_run_dir(run_dir)
        except UserError as e:
            err = str(e)
    err = dist.broadcast_object(err)
    if err:
        raise RunLockedError(err)


def fingerprint(path: Path) -> str:
    """sha256 of a file or of a directory's files (names + contents). Files over 256 MiB are hashed
    by size and their first and last 8 MiB, so checking an 8B checkpoint stays fast."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if size <= 256 * 2**20:
                h.update(fh.read())
            else:
                h.update(str(size).encode() + fh.read(8 * 2**20))
                fh.seek(size - 8 * 2**20)
                h.update(fh.read())
    return h.hexdigest()


def params_of(value):
    """A stage argument as recorded: config slices as dicts without their scheduling-only
    fields."""
    if dataclasses.is_dataclass(value):
        return {f.name: params_of(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("scheduling")}
    if isinstance(value, (list, tuple)):
        return [params_of(v) for v in value]
    return value


def _paths(value) -> list[Path]:
    if isinstance(value, Path):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Path) for v in value):
        return list(value)
    return []


def iteration_dir(run_dir: Path, rnd: int, t: int, rounds: int) -> Path:
    """The one place that names an iteration's directory: iter{t},
    or round{r}/iter{t} with rounds > 1."""
    return Path(run_dir) / (f"iter{t}" if rounds == 1 else f"round{rnd}/iter{t}")


def iteration_stages(cfg: dict, gold: bool, stop: bool = False) -> list[str]:
    """The one list of the stages an iteration of run_em.py records, in order (Algorithm 1, lines
    4-8), from the config as config.json holds it: `run_em.py status` plans from it and run_em.py
    checks every iteration against it. `gold`: the sandbox's diagnostics (mt/gold.py enabled)."""
    e_step = ["sample", "score", "pairs", "ref_logps", "dpo"]  # line 4, Eq. 4
    selection = ["select"] + (["gold_curve"] if gold else [])  # line 5, Eq. 6-7
    diagnosis = ["gold"] if gold else []
    if stop:  # a τ stop keeps π_{t-1} and r_{t-1}: no M-step
        return e_step + selection + diagnosis
    prune = ["prune"] if cfg["em"].get("keep_checkpoints") == "selected" else []
    m_step = ["pseudo_pairs", "rm_data", "rm", "rm_eval"] if cfg["em"]["update_rm"] else []
    return e_step + selection + prune + m_step + diagnosis  # lines 6-8, Eq. 5


def run_stages(cfg: dict, gold: bool, stops=()) -> list[str]:
    """Every stage a run records, in order, given the iterations (tags, e.g. iter2) whose τ test
    stopped them so far: with --em.on_stop end the first stop ends the run; with skip a stopped
    iteration records no M-step and the run goes on."""
    stops = {stops} if isinstance(stops, str) else set(stops)
    end = cfg["em"].get("on_stop", "end") == "end"  # a config.json from before the flag: end
    names = ["splits"]
    rounds = cfg["em"]["rounds"]
    for rnd in range(1, rounds + 1):
        for t in range(1, cfg["iters"] + 1):
            tag = iteration_dir(Path(), rnd, t, rounds).as_posix()
            names += [f"{tag}/{s}" for s in iteration_stages(cfg, gold, stop=tag in stops)]
            if tag in stops and end:
                return names
    return names


def iteration_dirs(run_dir: Path) -> list[Path]:
    """Every iteration directory a run has made so far,
    in the order it made them (from its config)."""
    cfg = read_json(Path(run_dir) / "config.json")
    rounds, iters = cfg["em"]["rounds"], cfg["iters"]
    dirs = [iteration_dir(run_dir, r, t, rounds) for r in range(1, rounds + 1)
            for t in range(1, iters + 1)]
    return [p for p in dirs if p.is_dir()]


def clean_leftovers(run_dir: Path):
    """Hidden partial writes of a killed run (atomic writes' temp files, a directory swap's old
    copy): unreferenced by construction, removed at the next start under the lock."""
    for p in list(run_dir.rglob(".*.tmp")) + list(run_dir.rglob(".*.old-*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _leaves(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}."""
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class Manifest:
    """<run>/config.json and <run>/manifest.json, written atomically by rank 0."""

    def __init__(self, run_dir, cfg=None, force: bool = False):
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / "manifest.json"
        self.reached: list[str] = []  # every stage this process came to, done or run, in order
        hold_run_dir(self.run_dir)  # rank 0 holds the lock for every rank; all stop if it is taken
        if dist.get().is_main:
            clean_leftovers(self.run_dir)
        if cfg is not None:
            self.check_config(cfg, force)
        self.data = read_json(self.path) if self.path.is_file() else {"stages": {}}
        if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
            raise UserError(f"{self.path}: not a manifest (no \"stages\" object). Fix: move it away to "
                            "redo every stage, or restore it from a copy of the run")
        if dist.get().is_main and "pruning" in self.data:  # a kill interrupted a prune: finish it
            self._finish_prune()

    def check_config(self, cfg, force: bool):
        """A rerun must use the run's config:
        otherwise finished stages would mix two experiments."""
        path = self.run_dir / "config.json"
        new = C.to_dict(cfg)
        if path.is_file():
            old = read_json(path)
            skip = flags.scheduling_only(cfg)
            # a key added to the code since the run began, at its default, is what the run did
            now, was, default = _leaves(new), _leaves(old), _leaves(C.to_dict(type(cfg)()))
            added = {k for k, v in now.items() if k not in was and v == default.get(k)}
            changed = [c for c in C.diff(old, new) if c.split(":")[0] not in {*skip, *added}]
            if changed and not force:
                raise flags.ConfigError(
                    f"{path}: this run was started with a different config:\n  "
                    + "\n  ".join(changed)
                    + "\nFix: use the original flags, a new --out, or --force_config true to continue "
                    "with the new config (finished stages whose inputs are unchanged are kept).")
        if dist.get().is_main:
            write_json(path, new)

    def _key(self, p: Path) -> str:
        """Paths inside the run are recorded relative to it,
        so a moved run directory stays valid."""
        p = p.resolve()
        return p.relative_to(self.run_dir).as_posix() if p.is_relative_to(self.run_dir) else str(p)

    def _hashes(self, paths) -> dict | None:
        if not all(p.exists() for p in paths):
            return None
        return {self._key(p): fingerprint(p) for p in paths}

    def _done(self, name, inputs, outputs, params) -> bool:
        st = self.data["stages"].get(name)
        return (bool(st) and st["params"] == params and st["inputs"] == self._hashes(inputs)
                and st["outputs"] == self._hashes(outputs))

    def _forget(self, name: str, outputs):
        """A finished stage whose inputs or params changed: drop its record,
        then its stale outputs.

        In that order, so a crash in between leaves an unrecorded stage, which is redone; a stage
        that was never recorded keeps its partial outputs (a DPO stage resumes from its last
        checkpoint).
        """
        del self.data["stages"][name]
        write_json(self.path, self.data)
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def record(self, name: str, inputs, outputs, params, seconds: float, info: dict | None):
        self.data["stages"][name] = {"status": "done", "params": params,
                                     "inputs": self._hashes(inputs),
                                     "outputs": self._hashes(outputs),
                                     "seconds": round(seconds, 2), "info": info or {}}
        write_json(self.path, self.data)

    def prune(self, name: str, victims: list[Path]):
        """Delete the directories `victims` (candidates model selection did not choose) without breaking
        resume: the intent is recorded first, then the deletion, then every stage record that hashed a
        directory holding a victim is re-hashed, in one manifest write. A kill in between is finished
        at the next start."""
        self.reached.append(name)
        if name in self.data["stages"]:
            dist.print0(f"[done] {name}")
            return
        dist.print0(f"[run]  {name}: removing {', '.join(p.name for p in victims) or 'nothing'}")
        if dist.get().is_main:
            self.data["pruning"] = {"name": name, "victims": [self._key(p) for p in victims]}
            write_json(self.path, self.data)
            self._finish_prune()
        dist.barrier()

    def _finish_prune(self):
        job = self.data["pruning"]
        victims = [self.run_dir / v for v in job["victims"]]
        for p in victims:
            shutil.rmtree(p, ignore_errors=True)
        for st in self.data["stages"].values():
            for side in ("inputs", "outputs"):
                for key in list(st.get(side) or {}):
                    p = Path(key) if Path(key).is_absolute() else self.run_dir / key
                    if any(p in v.parents for v in victims):
                        st[side][key] = fingerprint(p)
        self.data["stages"][job["name"]] = {"status": "done", "params": {}, "inputs": {},
                                            "outputs": {}, "seconds": 0.0,
                                            "info": {"removed": job["victims"]}}
        del self.data["pruning"]
        write_json(self.path, self.data)

    def stage(self, name: str, fn, outputs: list[Path], **args):
        """Run fn(**args) on every rank unless this stage is recorded done with these inputs and
        params.

        Returns fn's result, or the recorded info of a finished stage.
        """
        self.reached.append(name)
        outputs = [Path(p) for p in outputs]
        # a path that is an output, lies inside one or holds one is where the stage writes,
        # not an input
        inputs = [p for v in args.values() for p in _paths(v)
                  if not any(p == o or o in p.parents or p in o.parents for o in outputs)]
        params = json.loads(json.dumps({k: params_of(v) for k, v in args.items()
                                        if not _paths(v)}))
        done = dist.broadcast_object(self._done(name, inputs, outputs, params)
                                     if dist.get().is_main else None)
        if done:
            dist.print0(f"[done] {name}")
            return self.data["stages"][name].get("info", {}) if dist.get().is_main else {}
        stale = name in self.data["stages"]
        dist.print0(f"[run]  {name}"
                    + ("  (inputs or config changed since it last ran)" if stale else ""))
        if stale and dist.get().is_main:
            self._forget(name, outputs)
        dist.barrier()
        t0 = time.time()
        info = fn(**args)
        dist.barrier()
        if dist.get().is_main:
            self.record(name, inputs, outputs, params, time.time() - t0,
                        info if isinstance(info, dict) else None)
        dist.barrier()
        return info
