"""The sandbox comparison: Mutual-Taught against its baselines and ablations on the same worlds,
paired by seed, with the mechanism measured by the gold reward.

    # gold view of one run directory (mt/gold.py)
    python eval/sandbox_report.py --run runs/mt
    # every variant x seed, 2 runs at a time; resumable per (variant, seed)
    python eval/sandbox_report.py --seeds 0-14 --jobs 2 --out runs/report
    # the exploit world (r0 trained on π0's samples only)
    python eval/sandbox_report.py --world exploit --seeds 0-14 --jobs 2 --out runs/report-exploit

Writes OUT/NAME.md, OUT/NAME.json and OUT/NAME-figures/*.png (--name, default report;
matplotlib optional): the
over-optimisation curves (gold against cumulative DPO steps, every checkpoint), the RMs' gold
agreement per iteration, and the paired differences from Mutual-Taught with their intervals.

Every difference is paired: a variant minus Mutual-Taught on the same seed (same world, same
prompts, same random streams where the runs coincide), its mean and 95% t-interval over seeds.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# `python eval/sandbox_report.py`: make `mt` importable from the repo root
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import plot_run  # noqa: E402
from mt import config as C  # noqa: E402
from mt import dist, flags, gold, sandbox  # noqa: E402
from mt.data import read_json, read_samples  # noqa: E402
from mt.flags import opt  # noqa: E402
from mt.errors import UserError  # noqa: E402
from mt.manifest import lock_run_dir  # noqa: E402


REPO = Path(__file__).resolve().parent.parent


# variant -> its preset (mt/config.py): Mutual-Taught
# and every baseline / ablation the sandbox scales
# (and the sandbox-only positive controls, e.g. no-select-oracle)
VARIANTS = {"mutual-taught": "sandbox",
            **{k: f"sandbox-{k}" for k in {**C.VARIANTS, **C.SANDBOX_VARIANTS}}}
MT = "mutual-taught"


def differences(preset: str) -> str:
    """The values a preset sets that differ from the sandbox's Mutual-Taught."""
    base = C.PRESETS["sandbox"]
    diff = {k: v for k, v in C.PRESETS[preset].items() if base.get(k) != v}
    return " ".join(f"--{k} {v:.3g}" if isinstance(v, float) else f"--{k} {v}"
                    for k, v in diff.items())


@dataclass
class ReportConfig:
    run: str = ""  # one run directory: print its gold table
    seeds: str = "0-14"  # seeds of the comparison: comma-separated, ranges allowed (0-14)
    # comma-separated, of VARIANTS (default: the paper's, without the positive controls)
    variants: str = ",".join(v for v in VARIANTS if v not in C.SANDBOX_VARIANTS)
    world: str = opt("general", choices=("general", "exploit"))  # the sandbox world (regime)
    out: str = "runs/sandbox_report"  # where the comparison's runs and report go
    # OUT/NAME.md, OUT/NAME.json, OUT/NAME-figures/: several reports can share one set of runs
    name: str = "report"
    jobs: int = opt(1, above=0)  # runs at once, each its own process (one thread each)
    plot: bool = False  # also write each run's figures (eval/plot_run.py) to RUN/plots/*.png
    # --dpo.lr for every run (a study of E-step strength); 0 = each preset's, the calibrated
    # SANDBOX_DPO_LR. Give each rate its own --out: the run directories do not name it
    dpo_lr: float = opt(0.0, min=0)


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-14' or '0-4,10' -> the seeds, in order."""
    out = []
    try:
        for part in (p for p in text.split(",") if p):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise flags.ConfigError(f"--seeds {text!r}: expected comma-separated integers or ranges, "
                            "e.g. 0-14. Fix: write the seeds like that") from None
    return out


# ---- one run's numbers


def tau_view(it: Path) -> dict:
    """The τ test of one iteration (selection.json, Eq. 6 on D_MS): the best candidate's win rate
    strict (as written) and with half credit for ties, its tie share, and gold's strict win and tie
    share on the very responses r_{t-1} judged (what a perfect judge would have decided)."""
    sel = read_json(it / "selection.json")
    cands = sel["candidates"]
    best = max(cands, key=lambda k: cands[k]["wins"] / cands[k]["n"])
    half = max(cands, key=lambda k: (cands[k]["wins"] + cands[k]["ties"] / 2) / cands[k]["n"])
    d = it / "selection"
    prev = read_samples(d / "prev.samples.jsonl")
    judged = sel.get("best") or sel["chosen"]  # with --em.select false: the final checkpoint
    new = read_samples(d / f"{judged}.samples.jsonl")
    g = sandbox.gold_win_rate(new, prev)
    c = cands[best]
    return {"best_strict": c["wins"] / c["n"], "best_ties": c["ties"] / c["n"],
            "best_half": (cands[half]["wins"] + cands[half]["ties"] / 2) / cands[half]["n"],
            "judged": judged, "gold_win": g["win"], "gold_tie": g["tie"]}


def run_record(run: Path) -> dict:
    """Per iteration, the gold numbers of the policy the run holds after it (a τ stop keeps
    π_{t-1}), the RMs' gold agreement, best-of-n, pseudo-pairs, the E-step's curve, the τ test
    (tau_view) and gold's strict win and tie share of π_t over π_{t-1} (4 samples per D_MS
    prompt, common random numbers)."""
    its = []
    steps_before = 0
    for row in gold.gold_view(run):
        g = row.get("gold")
        if g is None:
            break
        it = run / row["iter"]
        step = sandbox.gold_win_rate(
            read_samples(it / "gold" / "pi_t.samples.jsonl"),
            read_samples(it / "gold" / "pi_prev.samples.jsonl"))
        curve = [{**p, "cum_step": steps_before + p["step"]} for p in row.get("curve", [])]
        steps_before = curve[-1]["cum_step"] if curve else steps_before
        its.append({"iter": row["iter"], "chosen": row["chosen"], "gold": g["policy"]["gold"],
                    "prev_gold": g["policy"]["prev_gold"], "perfect": g["policy"]["perfect"],
                    "win_vs_pi0": g["policy"]["gold_win_vs_pi0"],
                    "agree": {k: v["agreement"] for k, v in g["agreement_pi_t"].items()},
                    "agree_prev": {k: v["agreement"] for k, v in g["agreement_pi_prev"].items()},
                    "best_of_n": g["best_of_n"], "best_of_n_oracle": g["policy"]["best_of_n_oracle"],
                    "st_acc": g["st_pairs_gold_acc"], "pseudo": g.get("pseudo"), "curve": curve,
                    "ties": statistics.mean(p["ties"] for p in curve if "ties" in p)
                    if len(curve) > 1 else math.nan,
                    "gold_step": {"win": step["win"], "tie": step["tie"]},
                    "tau": tau_view(it)})
    if not its:
        raise UserError(f"{run}: no iteration with gold diagnostics (gold.json); run it with the "
                        "sandbox and --sandbox.diagnostics true")
    return {"pi0_gold": its[0]["prev_gold"], "iters": its, "final_gold": its[-1]["gold"],
            "final_win_vs_pi0": its[-1]["win_vs_pi0"], "final_perfect": its[-1]["perfect"]}


def gold_after(rec: dict, t: int) -> float:
    """Gold of the policy after iteration t (a run that ended earlier holds its last one)."""
    return rec["iters"][min(t, len(rec["iters"])) - 1]["gold"] if t else rec["pi0_gold"]


# ---- statistics: paired over seeds

# two-sided 95% t quantiles by degrees of freedom (no scipy here); beyond 30, the normal's 1.96
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
       18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def interval(diffs: list[float]) -> tuple[float, float, int]:
    """(mean, 95% t half-width, n) of the defined values (None and NaN: undefined, left out)."""
    xs = [d for d in diffs if d is not None and not math.isnan(d)]
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan, len(xs)
    n = len(xs)
    t = T95.get(n - 1) or (T95[max(k for k in T95 if k <= n - 1)] if n - 1 <= 30 else 1.96)
    return statistics.mean(xs), t * statistics.stdev(xs) / math.sqrt(n), n


def paired(diffs: list[float]) -> str:
    """mean difference and its 95% t-interval over seeds (a paired comparison: same worlds)."""
    m, h, n = interval(diffs)
    if n == 0:
        return "-"
    if n == 1:
        return f"{m:+.3f} (1 seed)"
    return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]"


def _sub(a, b) -> float:
    """a − b, undefined (NaN) where either is (an accuracy over no pairs is None in gold.json)."""
    return math.nan if a is None or b is None else a - b


def _mean(xs) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return f"{statistics.mean(xs):.3f}" if xs else "-"


# ---- running


def run_all(seeds: list[int], variants: list[str], out: Path, jobs: int, world: str,
            dpo_lr: float = 0.0):
    """Every (variant, seed) as its own `python run_em.py` process, `jobs` at a time; a finished run
    is found done by its manifest, so an interrupted report resumes per (variant, seed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    todo = [(v, s) for s in seeds for v in variants]

    def one(vs):
        v, s = vs
        run = out / f"{v}-seed{s}"
        log = out / f"{v}-seed{s}.log"
        if (run / "summary.json").is_file():
            return 0  # finished before: nothing to redo
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            lr = ["--dpo.lr", repr(dpo_lr)] if dpo_lr else []
            rc = subprocess.run([sys.executable, str(REPO / "run_em.py"), "--preset", VARIANTS[v],
                                 "--seed", str(s), "--sandbox.world", world, "--out", str(run),
                                 *lr],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"{v} seed {s}: {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'}", flush=True)
        return rc
    # the worlds first, one per seed, so parallel runs never wait on one another's build
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda s: subprocess.run(
            [sys.executable, "-c", f"from mt import sandbox; sandbox.build_world({s}, "
             f"world={world!r})"], cwd=REPO, env=env, check=True, capture_output=True), seeds))
    with ThreadPoolExecutor(jobs) as pool:
        failed = [vs for vs, rc in zip(todo, pool.map(one, todo)) if rc != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed, e.g. {failed[:3]}; their logs are in {out}")


# ---- the report


def report(seeds: list[int], variants: list[str], out: Path, world: str, wall_s: float,
           name: str = "report", dpo_lr: float = 0.0) -> str:
    recs = {v: {s: run_record(out / f"{v}-seed{s}") for s in seeds} for v in variants}
    (out / f"{name}.json").write_text(json.dumps(recs, indent=1))
    mt = recs.get(MT)

    def vs_mt(v, fn):
        if v == MT or mt is None:
            return "—"
        return paired([_sub(fn(recs[v][s]), fn(mt[s])) for s in seeds])
    cmd = (f"python eval/sandbox_report.py --world {world} --seeds {','.join(map(str, seeds))} "
           f"--variants {','.join(variants)} --out {out} --name {name}"
           + (f" --dpo_lr {dpo_lr!r}" if dpo_lr else ""))
    lines = [f"World `{world}`, {len(seeds)} seeds ({','.join(map(str, seeds))}); `{cmd}`; "
             f"{wall_s / 60:.0f} min wall for this command's runs on this machine (runs found "
             "finished are not redone).", "",
             "Differences are paired (variant − Mutual-Taught on the same seed), mean and 95% "
             "t-interval over seeds. Gold is measured on D_MS (400 prompts, 4 samples each) for "
             "the policy each run ends with (a τ stop keeps π_{t-1}).", "",
             "### Final policy", "",
             "| variant | paper | iterations run | final gold | − MT [95% CI] | perfect | "
             "gold win vs π0 | − MT [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        named = {**C.VARIANTS, **C.SANDBOX_VARIANTS}
        paper = named[v][0] if v in named else "Table 1 Mutual-Taught"
        r = recs[v].values()
        lines.append(f"| {v} | {paper} | {_mean([len(x['iters']) for x in r])} | "
                     f"{_mean([x['final_gold'] for x in r])} | "
                     f"{vs_mt(v, lambda x: x['final_gold'])} | "
                     f"{_mean([x['final_perfect'] for x in r])} | "
                     f"{_mean([x['final_win_vs_pi0'] for x in r])} | "
                     f"{vs_mt(v, lambda x: x['final_win_vs_pi0'])} |")
    lines += ["", f"π0's gold on D_MS: {_mean([x['pi0_gold'] for x in (mt or recs[variants[0]]).values()])}.",
              "", "### Matched: π_t against Mutual-Taught's π_t (same number of E-steps)", "",
              "| variant | π1 gold − MT π1 | π2 gold − MT π2 | π3 gold − MT π2 |", "|---|---|---|---|"]
    for v in variants:
        if v == MT:
            continue
        lines.append(f"| {v} | {vs_mt(v, lambda x: gold_after(x, 1))} | "
                     f"{vs_mt(v, lambda x: gold_after(x, 2))} | "
                     + (paired([_sub(gold_after(recs[v][s], 3), gold_after(mt[s], 2))
                                for s in seeds]) if mt else "—") + " |")
    lines += ["", "### The mechanism (Fig. 3): the RMs' gold agreement on pairs of π_t's samples",
              "", "Within-prompt pairs of π_t's 4 samples per D_MS prompt that gold orders; "
              "agreement = share the RM orders as gold does. r_t − r_{t-1} > 0 is the paper's "
              "claim: the M-step makes the RM more accurate on the new policy's distribution. "
              "Only iterations that passed τ (and so ran their M-step) are counted; `seeds` says "
              "how many.", "",
              "| variant | iter | seeds | r0 | r_{t-1} | r_t | r_t − r_{t-1} [95% CI] | "
              "on π_{t-1}'s pairs: r_t − r_{t-1} | best-of-n gold: by r_t − by r0 | "
              "pseudo gold acc before → after | Δr AUC | ST pairs gold acc | D_MS ties |",
              "|" + "---|" * 13]
    for v in variants:
        for t in (1, 2, 3):
            its = [x["iters"][t - 1] for x in recs[v].values()
                   if len(x["iters"]) >= t and x["iters"][t - 1]["chosen"] != "stop"]
            if not its:
                continue
            ps = [i["pseudo"] for i in its if i["pseudo"]]
            if not ps:  # no M-step: r_t is r_{t-1}, and its differences are 0 by construction
                lines.append(
                    f"| {v} | {t} | {len(its)} | {_mean([i['agree']['r0'] for i in its])} | "
                    f"{_mean([i['agree']['r_prev'] for i in its])} | (no M-step) | - | - | - | "
                    f"- | - | {_mean([i['st_acc'] for i in its])} | "
                    f"{_mean([i['ties'] for i in its])} |")
                continue
            lines.append(
                f"| {v} | {t} | {len(its)} | {_mean([i['agree']['r0'] for i in its])} | "
                f"{_mean([i['agree']['r_prev'] for i in its])} | "
                f"{_mean([i['agree']['r_t'] for i in its])} | "
                f"{paired([_sub(i['agree']['r_t'], i['agree']['r_prev']) for i in its])} | "
                f"{paired([_sub(i['agree_prev']['r_t'], i['agree_prev']['r_prev']) for i in its])}"
                f" | {paired([_sub(i['best_of_n']['r_t'], i['best_of_n']['r0']) for i in its])} | "
                + (f"{_mean([p['acc_before'] for p in ps])} → {_mean([p['acc_after'] for p in ps])}"
                   f" | {_mean([p['auc'] for p in ps])}" if ps else "- | -")
                + f" | {_mean([i['st_acc'] for i in its])} | {_mean([i['ties'] for i in its])} |")
    lines += ["", "### Over-optimisation: gold at every checkpoint (mean over seeds)", "",
              "| variant | iter | seeds | " + " | ".join(["start", "ckpt-50", "ckpt-100", "ckpt-150",
                                                           "final (step)"])
              + " | drift at final | chosen |", "|" + "---|" * 10]
    for v in variants:
        for t in (1, 2, 3):
            its = [x["iters"][t - 1] for x in recs[v].values() if len(x["iters"]) >= t]
            if not its:
                continue
            cells = []
            for k in ("start", "ckpt-50", "ckpt-100", "ckpt-150", "final"):
                cells.append(_mean([p["gold"] for i in its for p in i["curve"]
                                    if p["checkpoint"] == k]))
            cells[-1] += f" ({_mean([i['curve'][-1]['step'] for i in its if i['curve']])[:-4]})"
            drift = _mean([i["curve"][-1]["drift"] for i in its if i["curve"]])
            chosen = ", ".join(f"{k} {n}" for k, n in sorted(
                {c: sum(i["chosen"] == c for i in its) for c in {i["chosen"] for i in its}}.items()))
            lines.append(f"| {v} | {t} | {len(its)} | " + " | ".join(cells)
                         + f" | {drift} | {chosen} |")
    table = "\n".join(lines)
    (out / f"{name}.md").write_text(table + "\n")
    figures(recs, seeds, variants, out / f"{name}-figures", world)
    return table


def mean_curve(recs) -> list[tuple[float, float]]:
    """(cumulative DPO steps, gold) of every checkpoint of every iteration, each the mean over the
    runs (records of one variant) that reached it, in step order."""
    pts = {}
    for rec in recs:
        for it in rec["iters"]:
            for p in it["curve"]:
                pts.setdefault((it["iter"], p["checkpoint"]), []).append((p["cum_step"], p["gold"]))
    return sorted((statistics.mean(a for a, _ in v), statistics.mean(b for _, b in v))
                  for v in pts.values())


def figures(recs: dict, seeds: list[int], variants: list[str], out: Path, world: str):
    """curves.png, agreement.png, paired.png under out (skipped, saying so, without matplotlib)."""
    try:
        fig = plot_run._figure(figsize=(11, 4.2))
    except UserError as e:
        print(f"no figures: {e}")
        return
    out.mkdir(parents=True, exist_ok=True)
    # over-optimisation: gold against cumulative DPO steps, mean over seeds, per variant
    ax = fig.subplots(1, 1)
    for j, v in enumerate(variants):
        xs = mean_curve(recs[v].values())
        ax.plot([a for a, _ in xs], [b for _, b in xs], marker="o", ms=3,
                color=f"C{j % 10}", ls="-" if j < 10 else "--", label=v)
    ax.set_xlabel("cumulative DPO steps (checkpoints of every iteration)")
    ax.set_ylabel("gold reward on D_MS (mean over seeds)")
    ax.set_title(f"Over-optimisation curves, world {world!r}, {len(seeds)} seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")

    # the mechanism: r0, r_{t-1}, r_t agreement on π_t's pairs, per variant with an M-step
    withm = [v for v in variants if any(i["pseudo"] for r in recs[v].values() for i in r["iters"])]
    fig = plot_run._figure(figsize=(11, 4.2))
    ax = fig.subplots(1, 1)
    width = 0.8 / 3
    labels = []
    for i, (v, t) in enumerate((v, t) for v in withm for t in (1, 2)):
        its = [r["iters"][t - 1] for r in recs[v].values()
               if len(r["iters"]) >= t and r["iters"][t - 1]["pseudo"]]
        labels.append(f"{v}\nt={t} ({len(its)})")
        for k, (rm, color) in enumerate((("r0", "tab:gray"), ("r_prev", "tab:blue"),
                                         ("r_t", "tab:orange"))):
            m, h, _ = interval([it["agree"][rm] for it in its])
            ax.bar(i + (k - 1) * width, m, width, yerr=0 if math.isnan(h) else h, color=color,
                   label={"r0": "r0", "r_prev": "r_{t-1}", "r_t": "r_t"}[rm] if i == 0 else None)
    ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("gold agreement on π_t's pairs (95% CI)")
    ax.set_ylim(0.4, 1.0)
    ax.set_title(f"Does the M-step make the RM more accurate on π_t? world {world!r}")
    ax.legend(fontsize=8)
    fig.savefig(out / "agreement.png", dpi=110, bbox_inches="tight")

    # paired differences of the final gold from Mutual-Taught
    if MT in recs:
        fig = plot_run._figure(figsize=(7, 0.35 * len(variants) + 1.2))
        ax = fig.subplots(1, 1)
        others = [v for v in variants if v != MT]
        for i, v in enumerate(others):
            m, h, _ = interval([_sub(recs[v][s]["final_gold"], recs[MT][s]["final_gold"])
                                for s in seeds])
            ax.errorbar(m, i, xerr=0 if math.isnan(h) else h, fmt="o", color="black", capsize=3)
        ax.axvline(0, color="tab:red", lw=1)
        ax.set_yticks(range(len(others)), others, fontsize=8)
        ax.set_xlabel("final gold − Mutual-Taught's (paired, 95% CI)")
        ax.set_title(f"world {world!r}, {len(seeds)} seeds", fontsize=9)
        fig.savefig(out / "paired.png", dpi=110, bbox_inches="tight")


def main(argv=None):
    a = flags.parse(sys.argv[1:] if argv is None else argv, ReportConfig(),
                "python eval/sandbox_report.py", __doc__)
    if a.run:
        print(gold.gold_table(gold.gold_view(Path(a.run))))
        for p in plot_run.plot_run(a.run) if a.plot else []:
            print(p)
        return
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise flags.ConfigError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    seeds = parse_seeds(a.seeds)
    out = Path(a.out)
    # a second report into this folder is refused, naming this one; its run_em.py children write
    # inside it as this process's own (mt/manifest.py ANCESTORS_ENV)
    lock_run_dir(out)
    t0 = time.perf_counter()
    run_all(seeds, variants, out, a.jobs, a.world, a.dpo_lr)
    print(report(seeds, variants, out, a.world, time.perf_counter() - t0, a.name, a.dpo_lr))
    for v in variants if a.plot else []:
        for s in seeds:
            for p in plot_run.plot_run(out / f"{v}-seed{s}"):
                print(p)


if __name__ == "__main__":
    dist.run(main)
