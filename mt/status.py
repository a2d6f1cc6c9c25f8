"""`python run_em.py status --out RUN`: where a run stands, read from its files, never its lock.

Which stages are done, running or left (the plan is mt/manifest.py run_stages, the one list
run_em.py checks its iterations against), their times, and the decisions so far: the checkpoint
chosen or the τ stop, ε_t and the pseudo-pairs kept, the RM's accuracies.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mt import config as C
from mt import gold
from mt.data import read_json
from mt.errors import UserError
from mt.manifest import live_holder, iteration_dirs, run_stages
from mt.train import metrics_summary


def _hms(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")


def _last_row(path: Path) -> dict:
    """The last complete row of a metrics.jsonl being appended to (a cut last line is skipped)."""
    last = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            last = row if isinstance(row, dict) else last
    return last


def _training(run_dir: Path, name: str) -> str:
    """A dpo / rm stage's progress on disk: its last logged step, or where it would resume."""
    tag, _, stage = name.rpartition("/")
    if stage not in ("dpo", "rm"):
        return ""
    d = run_dir / tag / ("policy" if stage == "dpo" else "rm")
    meta = d / "trainer_state" / "meta.json"
    total = read_json(meta).get("total") if meta.is_file() else None
    row = _last_row(d / "metrics.jsonl")
    if not row:
        return ""
    return (f"step {row.get('step')}{f'/{total}' if total else ''}, loss "
            f"{row.get('loss', float('nan')):.4f}")


def decisions(run_dir: Path, recorded: dict) -> list[str]:
    """Each iteration's decisions so far (of the stages recorded done): the checkpoint chosen or
    the τ stop, ε_t and the pseudo-pairs kept, the RM's accuracies."""
    out = []
    for it in iteration_dirs(run_dir):
        tag, parts = it.relative_to(run_dir).as_posix(), []

        def done(stage):
            return recorded.get(f"{tag}/{stage}", {}).get("status") == "done"
        if done("dpo") and (it / "policy" / "metrics.jsonl").is_file():
            dpo = metrics_summary(it / "policy")  # its accuracy: the implicit reward's
            if dpo:
                parts.append(f"DPO {dpo['steps']} steps, loss {dpo['first_loss']:.4f} → "
                             f"{dpo['loss']:.4f}, reward acc {dpo.get('accuracy', 0):.2f}")
        if done("select") and (it / "selection.json").is_file():
            sel = read_json(it / "selection.json")
            rates = ", ".join(f"{k} {v['win_rate']:.3f}"
                              for k, v in sel.get("candidates", {}).items())
            tau = sel.get("tau")
            if sel["stop"]:
                parts.append(f"τ stop: best win rate {sel['win_rate']:.3f} ({sel['best']}) < τ "
                             f"{tau}, keeps the previous models [{rates}]")
            else:
                vs = f" ≥ τ {tau}" if tau is not None else " (no selection: the last one)"
                parts.append(f"chosen {sel['chosen']}: win rate {sel['win_rate']:.3f}{vs} "
                             f"[{rates}]")
        if done("pseudo_pairs") and (it / "pseudo_pairs.info.json").is_file():
            pp = read_json(it / "pseudo_pairs.info.json")
            parts.append(f"ε_t {pp['eps_t']:.4g} ({pp['eps_mult']:g}×{pp['eps_stat']}, "
                         f"{pp['strategy']}): kept {pp['kept_total']}/{pp['n']} pseudo-pairs")
        rm = metrics_summary(it / "rm") if done("rm") else {}
        ev = read_json(it / "rm_eval.json") if done("rm_eval") else {}
        if rm.get("accuracy") is not None:
            acc = f"RM train acc {rm['accuracy']:.3f}"
            if ev.get("heldout_pairs"):
                acc += (f", held-out acc {ev['heldout_acc_prev']:.3f} → "
                        f"{ev['heldout_acc_new']:.3f} ({ev['heldout_pairs']} pairs)")
            parts.append(acc)
        if parts:
            out += [f"  {tag}:", *(f"    {p}" for p in parts)]
    return out


def eta(left: list[str], recorded: dict, running: str | None = None,
        running_for: float = 0.0) -> tuple[float, list[str]]:
    """Seconds until the stages `left` are done, each estimated by the mean time of the stages of
    the same kind already done (iter1/dpo for iter2/dpo: the same sizes); the running one less what
    it has run. Returns the seconds and the stages no done stage of their kind can time."""
    times: dict[str, list[float]] = {}
    for name, st in recorded.items():
        if st.get("status") == "done":
            times.setdefault(name.rpartition("/")[2], []).append(st.get("seconds", 0.0))
    total, unknown = 0.0, []
    for name in left:
        kind = times.get(name.rpartition("/")[2])
        if not kind:
            unknown.append(name)
            continue
        mean = sum(kind) / len(kind)
        total += max(0.0, mean - running_for) if name == running else mean
    return total, unknown


def status(run_dir) -> str:
    """Which stages are done, running or left, their times, and the decisions so far, read from
    the run's files without taking its lock (so it works beside a running run)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: no config.json, so not a run directory (run_em.py writes "
                        "config.json and manifest.json as it starts). Fix: pass a run's --out")
    cfg = read_json(run_dir / "config.json")
    manifest = run_dir / "manifest.json"
    recorded = read_json(manifest)["stages"] if manifest.is_file() else {}
    standalone = "samples" in cfg  # train_policy.py / train_rm.py: only their recorded stages
    holder = live_holder(run_dir)  # who runs there, or None; never takes the lock
    stops = []  # the iterations whose τ test stopped them (with --em.on_stop end, one at most)
    for it in [] if standalone else iteration_dirs(run_dir):
        tag = it.relative_to(run_dir).as_posix()
        if (f"{tag}/select" in recorded and (it / "selection.json").is_file()
                and read_json(it / "selection.json").get("stop")):
            stops.append(tag)
    skip = cfg.get("em", {}).get("on_stop", "end") == "skip"
    stop = ", ".join(stops) or None
    measured = not standalone and gold.enabled(cfg)  # the sandbox's gold stages, as the run decided
    plan = list(recorded) if standalone else run_stages(cfg, measured, stops)
    plan += [n for n in recorded if n not in plan]
    # a τ stop (--em.on_stop end) ends the run after its iteration's selection (and gold
    # diagnosis): the stages it cut are listed last; under skip the run goes on, nothing is cut
    cut = [] if standalone or skip else [n for n in run_stages(cfg, measured) if n not in plan]
    # the running stage began when the last one was recorded (or when the run took its lock)
    since = max((p.stat().st_mtime for p in (manifest, run_dir / ".lock") if p.is_file()),
                default=time.time())
    lines, first_left, running = [], True, None
    for name in plan + cut:
        st = recorded.get(name)
        if st and st.get("status") == "done":
            state, note = "done", _hms(st.get("seconds", 0))
        elif name in cut:
            state, note = "skipped", f"τ stop at {stop}"
        elif first_left and holder:
            state, note, running = "running", f"for {_hms(time.time() - since)}", name
            note += f"; {_training(run_dir, name)}" if _training(run_dir, name) else ""
            first_left = False
        else:
            state, note = "left", ""
            if first_left and _training(run_dir, name):
                note = f"partial: {_training(run_dir, name)} (a rerun resumes it)"
            first_left = False
        lines.append(f"  {state:<8} {name:<24} {note}".rstrip())
    done = sum(1 for n in plan if recorded.get(n, {}).get("status") == "done")
    left = sum(line.split()[0] in ("left", "running") for line in lines)
    skipped = sum(line.split()[0] == "skipped" for line in lines)
    if holder:
        head = f"running ({holder})"
    elif not left:
        head = "finished" + (f" (τ stop at {stop})" if stop else "")
    else:
        head = "stopped (rerun the same command to resume)"
    secs = sum(st.get("seconds", 0) for st in recorded.values())
    what = (f"preset {cfg.get('preset')}, T={cfg.get('iters')}"
            + (f", {cfg['em']['rounds']} rounds" if cfg.get("em", {}).get("rounds", 1) > 1
               else ""))
    out = [f"{run_dir}: {head}; {done} of {len(plan)} stages done in {_hms(secs)}"
           + (f", {skipped} skipped by the τ stop" if skipped else "") + f" ({what})",
           *lines]
    todo = [line.split()[1] for line in lines if line.split()[0] in ("left", "running")]
    if todo:
        secs_left, unknown = eta(todo, recorded, running, time.time() - since)
        out.append(f"ETA: {_hms(secs_left)} for {len(todo) - len(unknown)} of the {len(todo)} stages "
                   "left, each timed by the done stages of its kind"
                   + (f" ({len(unknown)} of kinds not yet run: {', '.join(unknown[:3])}"
                      f"{', …' if len(unknown) > 3 else ''}; add their time)" if unknown else ""))
    dec = decisions(run_dir, recorded) if not standalone else []
    if dec:
        out += ["decisions so far:", *dec]
    if (run_dir / "summary.json").is_file() and not holder:
        s = read_json(run_dir / "summary.json")
        out.append(f"output: policy {s['policy']}, rm {s['rm']}")
    return "\n".join(out)


@dataclass
class StatusConfig:
    out: str = ""  # the run directory (a run_em.py --out)


def status_main(argv: list[str]) -> str:
    doc = ("Where a run stands: which stages are done, running or left, their times, and the "
           "decisions so far (chosen checkpoint, τ stops, ε_t). Reads the run's files only; "
           "never takes its lock, so it runs beside a live run.")
    cfg = C.parse(argv, StatusConfig(), "python run_em.py status", doc)
    if not cfg.out:
        raise C.ConfigError("python run_em.py status: missing --out RUN (a run directory)")
    text = status(Path(cfg.out))
    print(text, flush=True)
    return text
