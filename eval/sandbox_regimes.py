"""The regimes study's analysis (issue 29): exactly the endpoints and decision rules of the
pre-registered plan, eval/sandbox_results/regimes/PLAN.md, from the three JSON files its commands
write (eval/sandbox_report.py, one per DPO learning rate).

    # where the plan's commands write (runs/regimes/lr$lr/regimes-lr$lr.json)
    python eval/sandbox_regimes.py --inputs runs/regimes
    # or the three files, wherever they are
    python eval/sandbox_regimes.py --inputs a/regimes-lr1e-05.json,b/regimes-lr2e-05.json,...

Writes OUT/regimes.json (every number, with the per-seed differences), OUT/regimes.md (tables and
the verdict of every decision rule) and OUT/regimes-figures/{curves,paired}.png (matplotlib
optional). Every difference is paired over the seeds a rate kept: mean and 95% t-interval
(eval/sandbox_report.py interval). A seed whose run is missing or incomplete at a rate is dropped
from every comparison at that rate, and named.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

# `python eval/sandbox_regimes.py`: make `mt` and `eval` importable from the repo root
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import plot_run  # noqa: E402
from eval.sandbox_report import (MT, VARIANTS, _sub, gold_after, interval, mean_curve,  # noqa: E402
                                 parse_seeds)
from mt import config as C  # noqa: E402
from mt import dist, flags  # noqa: E402
from mt.gold import _json_safe  # noqa: E402
from mt.errors import UserError  # noqa: E402

PLAN = "eval/sandbox_results/regimes/PLAN.md"
RATES = (1e-5, 2e-5, 5e-5)  # PLAN.md "Design": the calibration grid's three points
NS, IDPO, ORACLE = "no-select", "iterative-dpo", "no-select-oracle"
STUDY = (MT, NS, IDPO, ORACLE)
BAND = 0.01  # PLAN.md: "≈ 0" is an interval containing 0 within [-BAND, +BAND]
TAU = C.PRESETS["sandbox"]["em.tau"]  # the frozen τ; mt/em.py stops on win < τ, so a pass is ≥ τ
# the iterations a variant without a τ test always runs (a record with fewer is a failed run);
# Mutual-Taught may end early at a τ stop (--em.on_stop end), so it has no such count
ITERS = {v: C.PRESETS[VARIANTS[v]].get("iters", C.Config().iters) for v in (NS, IDPO, ORACLE)}

# name: (label, variant a, variant b, t): a − b paired over seeds; gold of π_t (gold_after), or
# t None: each run's final gold (iterative DPO's π3, Mutual-Taught's last kept policy)
ENDPOINTS = {
    "mt_minus_idpo": ("(1) Mutual-Taught − iterative DPO, final gold", MT, IDPO, None),
    "mt_minus_ns": ("(1) Mutual-Taught − no-select, final gold", MT, NS, None),
    "ns_minus_idpo": ("(2) no-select − iterative DPO at π2 (the M-step's effect)", NS, IDPO, 2),
    "oracle_minus_idpo": ("(3) oracle − iterative DPO at π2 (what any M-step could deliver)",
                          ORACLE, IDPO, 2),
    "oracle_minus_ns": ("(3) oracle − no-select at π2 (the pseudo-labels' cost)", ORACLE, NS, 2),
}

# the fields read, by dotted path (eval/sandbox_report.py run_record writes them)
RUN_FIELDS = ("pi0_gold", "final_gold", "iters")
ITER_FIELDS = ("iter", "chosen", "gold", "gold_step.win", "gold_step.tie", "tau.best_strict",
               "tau.best_half", "tau.gold_win", "tau.gold_tie", "agree.r0", "curve")
CURVE_FIELDS = ("checkpoint", "gold", "cum_step")


@dataclass
class RegimesConfig:
    # comma-separated: the three regimes-lr$lr.json files, or directories holding them (directly
    # or in lr$lr/, as the plan's commands write them)
    inputs: str = "runs/regimes"
    seeds: str = "15-29"  # the plan's seeds; any not in a rate's runs is dropped there, and named
    out: str = "eval/sandbox_results/regimes"  # regimes.{md,json}, regimes-figures/


# ---- reading


def _bad(where, what: str):
    fix = ("write it again with the plan's command (eval/sandbox_report.py: finished runs are "
           "not redone, the report is recomputed from them)")
    raise UserError(f"{where}: {what}. Fix: {fix}")


def _get(obj, dotted: str):
    for k in dotted.split("."):
        obj = obj[k]
    return obj


def _check(path: Path, v: str, s: str, rec: dict):
    """Every field the endpoints read, so a JSON from an older report fails here, by name."""
    def need(obj, fields, where):
        for f in fields:
            try:
                _get(obj, f)
            except (KeyError, TypeError):
                _bad(path, f"{v} seed {s}{where} has no field {f!r}")
    need(rec, RUN_FIELDS, "")
    for i, it in enumerate(rec["iters"], 1):
        need(it, ITER_FIELDS, f", iteration {i}")
        for p in it["curve"]:
            need(p, CURVE_FIELDS, f", iteration {i}, a curve point")


def find_inputs(text: str) -> dict[float, Path]:
    """The plan's rate -> its JSON file, from files and directories."""
    files = []
    for p in (Path(x) for x in text.split(",") if x):
        if p.is_dir():
            files += sorted(p.glob("regimes-lr*.json")) + sorted(p.glob("lr*/regimes-lr*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or directory. Fix: pass --inputs the directory "
                            "the plan's commands wrote (runs/regimes) or the three "
                            "regimes-lr$lr.json files")
    found = {}
    for f in files:
        m = re.fullmatch(r"regimes-lr(.+)\.json", f.name)
        try:
            lr = float(m.group(1)) if m else None
        except ValueError:
            lr = None
        if lr is None:
            raise UserError(f"{f}: not named regimes-lr$lr.json, so its learning rate is unknown. "
                            "Fix: pass the files the plan's commands wrote, under their names")
        if lr in found:
            raise UserError(f"{f}: a second JSON for lr {lr!r} (first {found[lr]}). Fix: pass one "
                            "file per learning rate")
        found[lr] = f
    missing = [lr for lr in RATES if lr not in found]
    if missing:
        raise UserError(f"{text}: no regimes-lr$lr.json for lr {', '.join(map(repr, missing))}. "
                        "Fix: run the plan's commands for every rate, or pass those files")
    return {lr: found[lr] for lr in RATES}


def load(path: Path) -> dict:
    """{variant: {seed (str): record}} of one rate, every field the endpoints read checked."""
    try:
        recs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _bad(path, f"unreadable ({e})")
    missing = [v for v in STUDY if v not in recs]
    if missing:
        _bad(path, f"no runs of {', '.join(missing)} (the plan's four variants: {', '.join(STUDY)})")
    for v in STUDY:
        for s, rec in recs[v].items():
            _check(path, v, s, rec)
    return recs


def kept_seeds(recs: dict, seeds: list[int]) -> tuple[list[str], dict[str, str]]:
    """The seeds every variant ran to its end at this rate, and each dropped one with why."""
    dropped = {}
    for s in map(str, seeds):
        why = [f"{v}: no run" for v in STUDY if s not in recs[v]]
        why += [f"{v}: {len(recs[v][s]['iters'])} of its {n} iterations"
                for v, n in ITERS.items() if s in recs[v] and len(recs[v][s]["iters"]) < n]
        if why:
            dropped[s] = "; ".join(why)
    return [str(s) for s in seeds if str(s) not in dropped], dropped


# ---- statistics


def classify(lo: float, hi: float) -> str:
    """PLAN.md "Definitions": the class of a 95% interval."""
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"  # fewer than two seeds: no interval
    if lo > 0:
        return "> 0"
    if hi < 0:
        return "< 0"
    if -BAND <= lo and hi <= BAND:  # contains 0 here, as neither end excludes it
        return "≈ 0"
    return "inconclusive"


def summary(values: dict[str, float]) -> dict:
    """Mean, 95% t-interval, n and class of per-seed values, the values kept beside them."""
    m, h, n = interval(list(values.values()))
    lo, hi = (m - h, m + h) if n > 1 else (math.nan, math.nan)
    return {"mean": m, "lo": lo, "hi": hi, "n": n, "class": classify(lo, hi), "per_seed": values}


def _value(rec: dict, t: int | None) -> float:
    return rec["final_gold"] if t is None else gold_after(rec, t)


def per_iteration(recs: dict, seeds: list[str]) -> dict:
    """Endpoint (4): per variant and iteration, over the kept seeds that ran it."""
    out = {}
    for v in STUDY:
        for t in range(1, max(ITERS.values()) + 1):
            its = {s: recs[v][s]["iters"][t - 1] for s in seeds if len(recs[v][s]["iters"]) >= t}
            if not its:
                continue

            def col(f, its=its):
                return summary({s: _get(i, f) for s, i in its.items()})
            out.setdefault(v, {})[t] = {
                "seeds": len(its), "tau_stops": sum(i["chosen"] == "stop" for i in its.values()),
                "gold_win": col("gold_step.win"), "gold_tie": col("gold_step.tie"),
                "tau_pass_strict": summary({s: float(i["tau"]["best_strict"] >= TAU)
                                            for s, i in its.items()}),
                "tau_pass_half": summary({s: float(i["tau"]["best_half"] >= TAU)
                                          for s, i in its.items()}),
                "tau_gold_win": col("tau.gold_win"), "tau_gold_tie": col("tau.gold_tie"),
                "r0_agree": col("agree.r0")}
    return out


def within_fall(recs: dict, seeds: list[str], v: str = NS) -> dict:
    """R4's premise per iteration: gold at the final checkpoint minus at the best checkpoint (the
    one with the highest mean gold over seeds; `start` is π_{t-1}, not a checkpoint), paired.
    A mean over seeds needs the checkpoint on every seed: an E-step left with fewer pairs ends
    before a checkpoint (e.g. 147 steps, no ckpt-150), so the candidates are the checkpoints every
    seed reached, and the ones left out are named with the seeds that lack them."""
    out = {}
    for t in range(1, ITERS[v] + 1):
        its = {s: {p["checkpoint"]: p["gold"] for p in recs[v][s]["iters"][t - 1]["curve"]}
               for s in seeds}
        names = dict.fromkeys(k for c in its.values() for k in c if k != "start")  # in order
        every = [k for k in names if all(k in c for c in its.values())]
        left_out = {k: [s for s, c in its.items() if k not in c] for k in names if k not in every}
        best = max(every, key=lambda k: statistics.mean(c[k] for c in its.values()), default=None)
        if best is not None:
            out[t] = {"best": best, "left_out": left_out,
                      **summary({s: c["final"] - c[best] for s, c in its.items()})}
    return out


def analyse_rate(recs: dict, seeds: list[int]) -> dict:
    kept, dropped = kept_seeds(recs, seeds)
    ends = {k: summary({s: _sub(_value(recs[a][s], t), _value(recs[b][s], t)) for s in kept})
            for k, (_, a, b, t) in ENDPOINTS.items()}
    # PLAN.md: r0 degrades if no-select's agree.r0 at iteration 2 − at iteration 1 is < 0
    degr = summary({s: _sub(recs[NS][s]["iters"][1]["agree"]["r0"],
                            recs[NS][s]["iters"][0]["agree"]["r0"]) for s in kept})
    return {"seeds": [int(s) for s in kept], "dropped": {int(s): w for s, w in dropped.items()},
            "endpoints": ends, "r0_degrades": {**degr, "degrades": degr["class"] == "< 0"},
            "no_select_fall": within_fall(recs, kept), "per_iteration": per_iteration(recs, kept)}


# ---- the decision rules, mechanically


def rules(rates: dict) -> dict:
    """R1-R5 of PLAN.md on the per-rate results (keys: the rates' repr)."""
    cls = {e: {lr: r["endpoints"][e]["class"] for lr, r in rates.items()} for e in ENDPOINTS}
    two, three = cls["ns_minus_idpo"], cls["oracle_minus_idpo"]
    degrading = [lr for lr, r in rates.items() if r["r0_degrades"]["degrades"]]
    out = {}

    r1 = all(c == "≈ 0" for c in two.values()) and all(c == "> 0" for c in three.values())
    out["R1"] = {"fires": r1, "r0_degrades_at": degrading, "verdict": (
        "the M-step's mechanism can help here and r_{t-1}'s pseudo-labels are what keeps it from "
        "doing so" if r1 else "not met: (2) is not ≈ 0 at every rate, or (3) not > 0 at every "
        "rate") + f" ((2): {_cells(two)}; (3): {_cells(three)}; r0 degrades at: "
        f"{', '.join(degrading) or 'no rate'})"}

    gentle, strong = repr(RATES[0]), [repr(lr) for lr in RATES[1:]]
    r2 = any(two[lr] == "> 0" for lr in strong) and two[gentle] != "> 0"
    out["R2"] = {"fires": r2, "verdict": (
        "the earlier study's \"the M-step does not help\" holds only in the gentle regime (1e-5)"
        if r2 else "not met") + f" ((2): {_cells(two)})"}

    failed = [lr for lr, c in three.items() if c != "> 0"]
    out["R3"] = {"fires": bool(failed), "rates": failed, "verdict": (
        f"the control failed at {', '.join(failed)}: this sandbox cannot test the M-step there, "
        "and (2) there is uninformative, not evidence against the paper" if failed
        else "not met: the control (3) is > 0 at every rate") + f" ((3): {_cells(three)})"}

    sel = cls["mt_minus_ns"]
    falls = {lr: any(f["class"] == "< 0" for f in r["no_select_fall"].values())
             for lr, r in rates.items()}
    earns = [lr for lr in rates if sel[lr] == "> 0" and falls[lr]]
    never = all(c in ("≈ 0", "< 0") for c in sel.values())
    # PLAN.md: a conclusion resting on one rate's secondary endpoint ((1), (4)) is exploratory
    out["R4"] = {"fires": bool(earns) or never, "earns_keep_at": earns, "does_not": never,
                 "no_select_falls": falls, "exploratory": len(earns) == 1, "verdict": (
        f"model selection earns its keep at {', '.join(earns)}"
        + (" (exploratory: one rate's secondary endpoint)" if len(earns) == 1 else "") if earns else
        "model selection does not earn its keep in this sandbox" if never else
        "neither part met") + f" (Mutual-Taught − no-select: {_cells(sel)}; no-select's gold "
        f"falls within an iteration at: {', '.join(lr for lr, f in falls.items() if f) or 'no rate'})"}

    # Mutual-Taught's iteration 1: the variant whose τ test decides (its E-step is the
    # no-select runs' iteration 1, but only it chooses among the checkpoints)
    r5 = {}
    for lr, r in rates.items():
        it1 = r["per_iteration"].get(MT, {}).get(1)  # none: every seed dropped at this rate
        win, passed = ((it1["tau_gold_win"]["mean"], it1["tau_pass_strict"]["mean"]) if it1
                       else (math.nan, math.nan))
        r5[lr] = {"fires": win < TAU and passed > 0.5, "gold_win": win, "pass_strict": passed}
    out["R5"] = {"fires": any(x["fires"] for x in r5.values()), "per_rate": r5,
                 "exploratory": True, "verdict": "stated per rate, each exploratory (one rate's "
                 "secondary endpoint (4)): " + "; ".join(
        f"{lr}: " + ("τ is passed by the RM breaking gold ties" if x["fires"] else "not met")
        + f" (gold strict win {x['gold_win']:.3f}, strict τ pass rate {x['pass_strict']:.3f})"
        for lr, x in r5.items())}
    return out


def _cells(by_rate: dict) -> str:
    return ", ".join(f"{lr} {c}" for lr, c in by_rate.items())


# ---- the report


def _ci(x: dict) -> str:
    if x["n"] == 0:
        return "-"
    if x["n"] == 1:
        return f"{x['mean']:+.3f} (1 seed)"
    return f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}] **{x['class']}**"


def _m(x: dict) -> str:
    return "-" if x["n"] == 0 else f"{x['mean']:.3f}"


def _left_out(fall: dict) -> str:
    """The checkpoints R4's best was not chosen among, because some seed never reached them."""
    return "".join(f"; {k} left out: not reached by seed {', '.join(ss)}"
                   for k, ss in fall.get("left_out", {}).items())


def markdown(res: dict) -> str:
    rates = res["rates"]
    lrs = list(rates)
    lines = [f"The regimes study's endpoints and decision rules, exactly as [PLAN.md](PLAN.md) "
             f"defines them, from {', '.join(f'`{p}`' for p in res['inputs'].values())}; "
             f"`{res['command']}`.", "",
             "Paired over the seeds each rate kept: mean [95% t-interval] and its class (> 0, "
             f"< 0, ≈ 0 within [−{BAND}, +{BAND}], inconclusive). τ = {TAU}. Primary endpoints: (2) "
             "and (3); the others are secondary, reported without a multiplicity correction. "
             "Every interval of endpoint (4) and every per-seed value is in regimes.json.", "",
             "### Seeds", "", "| lr | seeds kept | dropped (why) |", "|---|---|---|"]
    for lr, r in rates.items():
        drop = "; ".join(f"{s} ({w})" for s, w in r["dropped"].items()) or "none"
        lines.append(f"| {lr} | {len(r['seeds'])} | {drop} |")
    lines += ["", "### Endpoints (1)-(3)", "", "| endpoint | " + " | ".join(lrs) + " |",
              "|---" * (len(lrs) + 1) + "|"]
    for k, (label, *_) in ENDPOINTS.items():
        lines.append(f"| {label} | " + " | ".join(_ci(rates[lr]["endpoints"][k]) for lr in lrs)
                     + " |")
    lines.append("| r0 degrades: no-select's r0 agreement, iteration 2 − 1 | "
                 + " | ".join(_ci(rates[lr]["r0_degrades"]) for lr in lrs) + " |")
    lines.append("| no-select's gold, final − best checkpoint (R4), iteration 1; 2 | " + " | ".join(
        "; ".join(f"{_ci(f)} (best {f['best']}{_left_out(f)})"
                  for f in rates[lr]["no_select_fall"].values())
        for lr in lrs) + " |")
    if any(f.get("left_out") for r in rates.values() for f in r["no_select_fall"].values()):
        lines += ["", "R4's best checkpoint is the one with the highest mean gold over seeds, so it "
                  "is chosen among the checkpoints every seed reached: an E-step whose filtered "
                  "pairs give fewer steps ends before a later checkpoint. The committed analysis "
                  "(c1fd791) assumed every seed had the same checkpoints and stopped with a "
                  "KeyError on these runs; this is the one change to it, made after the runs, "
                  "and it changes no other number."]
    lines += ["", "### Endpoint (4): per iteration (means over the seeds that ran it)", "",
              "τ pass: the share of seeds whose best Eq. 6 win rate reaches τ (for the variants "
              "without selection, the test Mutual-Taught would have applied). An iteration that "
              "stopped at τ is counted: its π_t is the π_{t-1} the run keeps.", "",
              "| lr | variant | iter | seeds (τ stops) | gold win π_t vs π_{t-1} | tie | τ pass "
              "strict | τ pass half | gold win on τ's responses | tie | r0 agreement on π_t |",
              "|---" * 11 + "|"]
    for lr, r in rates.items():
        for v, its in r["per_iteration"].items():
            for t, x in its.items():
                lines.append(f"| {lr} | {v} | {t} | {x['seeds']} ({x['tau_stops']}) | " + " | ".join(
                    _m(x[k]) for k in ("gold_win", "gold_tie", "tau_pass_strict", "tau_pass_half",
                                       "tau_gold_win", "tau_gold_tie", "r0_agree")) + " |")
    lines += ["", "### Decision rules", ""]
    lines += [f"- **{k}** ({'fires' if x['fires'] else 'does not fire'}): {x['verdict']}"
              for k, x in res["rules"].items()]
    return "\n".join(lines) + "\n"


def figures(res: dict, curves: dict, out: Path):
    """curves.png (gold against cumulative DPO steps, per rate and variant) and paired.png (the
    endpoints per rate with their intervals), skipped, saying so, without matplotlib."""
    try:
        fig = plot_run._figure(figsize=(14, 4.2))
    except UserError as e:
        print(f"no figures: {e}")
        return []
    out.mkdir(parents=True, exist_ok=True)
    axes = fig.subplots(1, len(curves), sharey=True)
    for ax, (lr, by_v) in zip(axes, curves.items()):
        for j, (v, xs) in enumerate(by_v.items()):
            ax.plot([a for a, _ in xs], [b for _, b in xs], marker="o", ms=3, color=f"C{j}", label=v)
        ax.set_title(f"DPO lr {lr}, {len(res['rates'][lr]['seeds'])} seeds")
        ax.set_xlabel("cumulative DPO steps")
    axes[0].set_ylabel("gold reward on D_MS (mean over seeds)")
    axes[0].legend(fontsize=7)
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")

    fig = plot_run._figure(figsize=(8, 4.5))
    ax = fig.subplots(1, 1)
    ax.axvspan(-BAND, BAND, color="0.9", label=f"≈ 0 band (±{BAND})")
    ax.axvline(0, color="tab:red", lw=1)
    for j, lr in enumerate(res["rates"]):
        for i, k in enumerate(ENDPOINTS):
            x = res["rates"][lr]["endpoints"][k]
            h = 0 if math.isnan(x["lo"]) else x["mean"] - x["lo"]
            ax.errorbar(x["mean"], i + (j - 1) * 0.22, xerr=h, fmt="o", color=f"C{j}", capsize=3,
                        label=f"lr {lr}" if i == 0 else None)
    ax.set_yticks(range(len(ENDPOINTS)), [v[0] for v in ENDPOINTS.values()], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("gold difference (paired over seeds, 95% t-interval)")
    ax.legend(fontsize=7)
    fig.savefig(out / "paired.png", dpi=110, bbox_inches="tight")
    return [out / "curves.png", out / "paired.png"]


def analyse(a: RegimesConfig) -> dict:
    seeds = parse_seeds(a.seeds)
    paths = find_inputs(a.inputs)
    recs = {repr(lr): load(p) for lr, p in paths.items()}
    rates = {lr: analyse_rate(r, seeds) for lr, r in recs.items()}
    res = {"plan": PLAN, "command": f"python eval/sandbox_regimes.py --inputs {a.inputs} --seeds "
           f"{a.seeds} --out {a.out}", "inputs": {repr(lr): str(p) for lr, p in paths.items()},
           "seeds": seeds, "tau": TAU, "band": BAND, "rates": rates, "rules": rules(rates)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # NaN (an undefined mean) as null, as the runs' own gold.json writes it
    (out / "regimes.json").write_text(json.dumps(_json_safe(res), indent=1, ensure_ascii=False))
    (out / "regimes.md").write_text(markdown(res))
    curves = {lr: {v: mean_curve(r[v][s] for s in map(str, rates[lr]["seeds"])) for v in STUDY}
              for lr, r in recs.items()}
    figures(res, curves, out / "regimes-figures")
    return res


def main(argv=None):
    a = flags.parse(sys.argv[1:] if argv is None else argv, RegimesConfig(),
                    "python eval/sandbox_regimes.py", __doc__)
    res = analyse(a)
    print(markdown(res))
    print(f"wrote {Path(a.out) / 'regimes.json'}, {Path(a.out) / 'regimes.md'}")


if __name__ == "__main__":
    dist.run(main)
