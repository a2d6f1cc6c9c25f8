r"""The paper's Table 1 (policy: AlpacaEval 2, Arena-Hard) and Table 2 (RM: RewardBench), as
markdown, from each run's evaluation files.

    python eval/tables.py --runs base,runs/mt,runs/iterative-dpo --labels "LLaMA-3-8B-Instruct,Mutual-Taught,DPO Iter3" \
        --out runs/tables.md

Each --runs entry is a directory whose results are in its eval/ folder (a run directory, or any
folder for a model evaluated alone, e.g. the base model); eval/README.md "Evaluation" writes them there:
    eval/rewardbench.json                    eval/rewardbench.py --out (Table 2: sections, average)
    eval/alpacaeval/model_outputs.json       eval/generate.py --format alpacaeval --out (its generator
    eval/alpacaeval/**/leaderboard.csv       names the row); alpaca_eval evaluate writes the csv beside
                                             it: length_controlled_winrate, win_rate, avg_length
    eval/arenahard.json                      written by hand from show_result.py's line for the model:
                                             {"arena_hard": {"score": 38.4, "ci": [-2.1, 2.0],
                                             "avg_tokens": 682}} (ci and avg_tokens optional)
A missing file is a "-" in its columns and is listed under the tables.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python eval/tables.py`: make `mt` and `eval` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.rewardbench import SECTIONS  # noqa: E402
from mt import dist  # noqa: E402
from mt.flags import ConfigError, parse  # noqa: E402
from mt.data import atomic_write_text  # noqa: E402
from mt.errors import UserError  # noqa: E402

ALPACAEVAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2.0's default (eval/README.md)


@dataclass
class TablesArgs:
    """python eval/tables.py: Table 1 and Table 2 of the paper from each run's eval/ files."""
    runs: str = ""  # (required) comma-separated directories, each with an eval/ folder; one row each
    labels: str = ""  # comma-separated row names; "" = each directory's name
    out: str = ""  # markdown file; "" = print only


class ResultError(UserError):
    """An evaluation file we cannot read; the message names the file and what to change."""


# ---- reading each tool's result file


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultError(f"{path}: unreadable ({e}). Fix: rewrite it with the command that made "
                          "it (eval/README.md)") from None


def _number(v, where: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ResultError(f"{where}: {v!r} is not a number") from None


def read_rewardbench(path: Path) -> dict:
    """eval/rewardbench.py --out: {section: percent, "average": percent} (None where missing)."""
    d = _json(path)
    if not isinstance(d, dict) or not isinstance(d.get("sections"), dict):
        raise ResultError(f"{path}: no 'sections'. Fix: pass the file eval/rewardbench.py --out writes")
    out = {s: _number(d["sections"].get(s), f"{path}: sections.{s}") for s in SECTIONS}
    return {**out, "average": _number(d.get("average"), f"{path}: average")}


def read_alpacaeval(folder: Path) -> dict | None:
    """The model's row of alpaca_eval's leaderboard.csv under folder (its name: the generator of
    folder/model_outputs.json, else the csv's only row)."""
    found = sorted(folder.glob("**/leaderboard.csv"))
    if not found:
        return None
    if len(found) > 1:
        found = [p for p in found if p.parent.name == ALPACAEVAL_ANNOTATOR] or found
        if len(found) > 1:
            raise ResultError(f"{folder}: several leaderboard.csv ({', '.join(map(str, found))}). "
                              "Fix: keep the one of the annotator you report")
    path, outputs = found[0], folder / "model_outputs.json"
    name = None
    if outputs.is_file():
        rows = _json(outputs)
        name = rows[0].get("generator") if isinstance(rows, list) and rows else None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        index = reader.fieldnames[0] if reader.fieldnames else ""  # pandas' unnamed index: the model
        rows = list(reader)
    mine = [r for r in rows if r.get(index) == name] if name else rows
    if len(mine) != 1:
        names = ", ".join(r.get(index, "") for r in rows[:10])
        raise ResultError(f"{path}: no single row for {name or 'the model'} (rows: {names}). Fix: "
                          f"keep {outputs} beside it, whose generator names the row")
    r = mine[0]
    for key in ("length_controlled_winrate", "win_rate"):
        if key not in r:
            raise ResultError(f"{path}: column {key!r} missing. Fix: an AlpacaEval 2 leaderboard "
                              "(alpaca_eval evaluate, default annotator) has it")
    return {"lc": _number(r["length_controlled_winrate"], f"{path}: length_controlled_winrate"),
            "wr": _number(r["win_rate"], f"{path}: win_rate"),
            "len": _number(r.get("avg_length"), f"{path}: avg_length")}


def read_arenahard(path: Path) -> dict:
    """eval/arenahard.json: {"arena_hard": {"score", "ci"?: [lo, hi] | "(lo, hi)", "avg_tokens"?}}."""
    d = _json(path)
    a = d.get("arena_hard") if isinstance(d, dict) else None
    if not isinstance(a, dict) or "score" not in a:
        raise ResultError(f"{path}: expected {{\"arena_hard\": {{\"score\": 38.4, \"ci\": [-2.1, 2.0], "
                          "\"avg_tokens\": 682}}. Fix: copy the numbers from show_result.py's line "
                          "for the model")
    ci = a.get("ci")
    if isinstance(ci, str):
        ci = [x.strip() for x in ci.strip("()[] ").split(",")]
    if ci is not None and (not isinstance(ci, list) or len(ci) != 2):
        raise ResultError(f"{path}: arena_hard.ci must be [lo, hi] or \"(lo, hi)\", got {a['ci']!r}")
    return {"score": _number(a["score"], f"{path}: arena_hard.score"),
            "ci": None if ci is None else [_number(x, f"{path}: arena_hard.ci") for x in ci],
            "len": _number(a.get("avg_tokens"), f"{path}: arena_hard.avg_tokens")}


def collect(run: Path) -> tuple[dict, list[str]]:
    """({"rewardbench", "alpacaeval", "arenahard"}: each result or None, the files not found)."""
    e = Path(run) / "eval"
    rb, ae, ah = e / "rewardbench.json", e / "alpacaeval", e / "arenahard.json"
    res = {"rewardbench": read_rewardbench(rb) if rb.is_file() else None,
           "alpacaeval": read_alpacaeval(ae) if ae.is_dir() else None,
           "arenahard": read_arenahard(ah) if ah.is_file() else None}
    missing = {"rewardbench": str(rb), "alpacaeval": f"{ae}/**/leaderboard.csv", "arenahard": str(ah)}
    return res, [missing[k] for k, v in res.items() if v is None]


# ---- the tables, in the paper's layout


def _f(v, fmt=".1f") -> str:
    return "-" if v is None else format(v, fmt)


def table1_row(label: str, res: dict) -> str:
    ae, ah = res["alpacaeval"] or {}, res["arenahard"] or {}
    score = _f(ah.get("score"))
    if ah.get("ci"):
        lo, hi = ah["ci"]
        score += f" ({lo:+.1f}, {hi:+.1f})"
    return (f"| {label} | {_f(ae.get('lc'))} | {_f(ae.get('wr'))} | {_f(ae.get('len'), '.0f')} | "
            f"{score} | {_f(ah.get('len'), '.0f')} |")


def table2_row(label: str, res: dict) -> str:
    rb = res["rewardbench"] or {}
    return "| " + " | ".join([label, *(_f(rb.get(s)) for s in [*SECTIONS, "average"])]) + " |"


TABLE1_HEAD = ("| Model | AlpacaEval 2 LC Win Rate | AlpacaEval 2 Win Rate | AlpacaEval 2 Avg. Len | "
               "Arena-Hard Win Rate (95% CI) | Arena-Hard Avg. Len |\n|---|---|---|---|---|---|")
TABLE2_HEAD = ("| Model | " + " | ".join([*SECTIONS, "Average"]) + " |\n"
               + "|---" * (len(SECTIONS) + 2) + "|")


def tables(rows: list[tuple[str, dict]]) -> str:
    """Both tables as markdown, one row per (label, collect(...)[0])."""
    t1 = "\n".join([TABLE1_HEAD, *(table1_row(lab, r) for lab, r in rows)])
    t2 = "\n".join([TABLE2_HEAD, *(table2_row(lab, r) for lab, r in rows)])
    return (f"Table 1: policy, AlpacaEval 2 and Arena-Hard (GPT-4 judged)\n\n{t1}\n\n"
            f"Table 2: reward model, RewardBench\n\n{t2}\n")


# ---- command line


def main(argv=None) -> str:
    a = parse(sys.argv[1:] if argv is None else list(argv), TablesArgs(), "python eval/tables.py",
              __doc__)
    runs = [Path(r) for r in a.runs.split(",") if r]
    if not runs:
        raise ConfigError("missing --runs (comma-separated directories, each with an eval/ folder)")
    labels = a.labels.split(",") if a.labels else [r.resolve().name for r in runs]
    if len(labels) != len(runs):
        raise ConfigError(f"--labels has {len(labels)} names for {len(runs)} --runs. Fix: one per run")
    for r in runs:
        if not r.is_dir():
            raise ConfigError(f"--runs: {r} does not exist. Fix: pass run directories (run_em.py --out)")
    rows, missing = [], []
    for label, r in zip(labels, runs):
        res, miss = collect(r)
        rows.append((label, res))
        missing += miss
    text = tables(rows)
    if missing:
        text += "\nNot found (shown as -): " + ", ".join(missing) + "\n"
    print(text, flush=True)
    if a.out:
        atomic_write_text(Path(a.out), lambda f: f.write(text))
        print(f"-> {a.out}", flush=True)
    return text


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
