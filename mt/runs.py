"""The models a run directory stands for: its selected policy and its final RM (summary.json).

The paper evaluates and publishes the *selected* checkpoint (Eq. 7), not an iteration's last one,
so every command that takes a model (--policy, --rm, --new_policy, ...) passes it through
`resolve_model`: a model directory is itself; a finished run directory is the model its
summary.json names; a directory of one iteration's checkpoints is refused with the one to use.
"""
from __future__ import annotations

import json
from pathlib import Path

from mt import dist
from mt.errors import UserError

ROLES = {"policy": "selected policy", "rm": "final RM"}


class ModelPathError(UserError):
    """A --policy / --rm that is not a model directory nor a finished run; the message says which to pass."""


def is_run_dir(path: Path) -> bool:
    """run_em.py's --out: its manifest.json or summary.json (a model directory has neither)."""
    return (path / "manifest.json").is_file() or (path / "summary.json").is_file()


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not is_run_dir(path)


def run_of(path: Path) -> Path | None:
    """The run directory above path, if any."""
    for p in Path(path).resolve().parents:
        if is_run_dir(p):
            return p
    return None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelPathError(f"{path}: unreadable ({e}). Fix: rerun the run_em.py command that "
                             "wrote it (finished stages are skipped)") from None


def summary_model(run: Path, role: str) -> Path:
    """summary.json's model for role: a relative path is inside the run; an absolute one inside
    config.json's out is rebased onto this run (a moved or copied run), any other is taken as is."""
    v = _read(run / "summary.json").get(role)
    if not v:
        raise ModelPathError(f"{run / 'summary.json'}: no {role!r}. Fix: rerun the run_em.py "
                             "command that made the run")
    p = Path(v)
    if not p.is_absolute():
        p = run / p
    elif (run / "config.json").is_file():
        old = Path(_read(run / "config.json").get("out", "/nonexistent"))
        if p.is_relative_to(old) and (run / p.relative_to(old)).exists():
            p = run / p.relative_to(old)
    if not (p / "config.json").is_file():
        raise ModelPathError(f"{run / 'summary.json'}: its {role} {v} is not a model directory "
                             f"(no {p / 'config.json'}). Fix: pass the model directory itself")
    return p


def _candidates(path: Path) -> list[str]:
    """ckpt-*/ and final/ holding config.json: one iteration's policy or RM checkpoints."""
    return sorted(p.name for p in path.iterdir()
                  if p.is_dir() and (p.name == "final" or p.name.startswith("ckpt-"))
                  and (p / "config.json").is_file())


def _refuse_candidates(path: Path, role: str):
    run = run_of(path)
    sel = path.parent / "selection.json"
    if path.name == "rm" or not sel.is_file():
        chosen = path / "final" if (path / "final").is_dir() else None
        source = "an iteration's RM is its final/"
    else:
        s = _read(sel)
        chosen, source = (path / s["chosen"] if s.get("chosen") else None), "selection.json"
        if s.get("stop"):
            source = (f"selection.json: best win rate {s.get('win_rate')} < τ={s.get('tau')}, so "
                      "this iteration kept none and the run kept the models before it")
    run_hint = f"the run directory {run}" if run else "the run directory"
    which = f"the selected one is {chosen} ({source})" if chosen else f"none was selected ({source})"
    fix = f"pass {run_hint}" + (f" or {chosen}" if chosen else "")
    raise ModelPathError(f"{path}: this holds the checkpoints of one iteration; {which}. Fix: {fix}")


def resolve_model(path, role: str) -> Path:
    """The model directory to use for --policy / --rm given a model directory, a finished run
    directory (its summary.json's selected policy or final RM, said in one line) or, refused, one
    iteration's checkpoints directory."""
    assert role in ROLES, role
    p = Path(path)
    if is_run_dir(p):
        if not (p / "summary.json").is_file():
            raise ModelPathError(f"{p}: this run has not finished (no summary.json), so it has no "
                                 f"{ROLES[role]} yet. Fix: rerun its run_em.py command to finish it "
                                 f"(`python run_em.py status --out {p}` shows what is left), or pass "
                                 "a checkpoint directory")
        model = summary_model(p, role)
        base = (_read(p / "config.json").get(role) if (p / "config.json").is_file() else None)
        note = ("" if model.resolve().is_relative_to(p.resolve()) else
                ", the base model: the run's first iteration stopped at τ"
                if base and Path(base).resolve() == model.resolve() else ", outside the run")
        dist.print0(f"{p}: the {ROLES[role]} is {model} (summary.json{note})")
        return model
    if (p / "config.json").is_file():
        return p
    if p.is_dir() and _candidates(p):
        _refuse_candidates(p, role)
    what = "does not exist" if not p.exists() else "is neither a model directory (no config.json) " \
        "nor a run directory (no summary.json)"
    raise ModelPathError(f"{p}: {what}. Fix: pass a Hugging Face model directory, or a finished "
                         f"run_em.py --out directory to use its {ROLES[role]}")
