"""The gold view of sandbox runs, and Mutual-Taught against its baselines and ablations over seeds.

    # gold table of one run directory
    python eval/sandbox_report.py --run runs/mt
    # every variant x seed: means and paired differences from Mutual-Taught, 2 runs at a time
    python eval/sandbox_report.py --seeds 0-14 --jobs 2 --out runs/report
    # and each run's figures (eval/plot_run.py) as PNGs under RUN/plots
    python eval/sandbox_report.py --run runs/mt --plot

In the sandbox the gold reward is known, so we measure what the paper can only estimate: the
policy's gold reward, its gold win rate against π0, the RM's agreement with gold on pairs from the
current policy, and the gold accuracy of the pseudo-pairs before and after filtering (mt/sandbox.py
gold_view).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# `python eval/sandbox_report.py`: make `mt` importable from the repo root
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import plot_run  # noqa: E402
from mt import config as C  # noqa: E402
from mt import dist, sandbox  # noqa: E402
from mt.config import opt  # noqa: E402
from mt.data import read_json  # noqa: E402
from mt.manifest import iteration_dirs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# variant -> its preset (mt/config.py): Mutual-Taught
# and every baseline / ablation the sandbox scales
VARIANTS = {"mutual-taught": "sandbox", **{k: f"sandbox-{k}" for k in C.VARIANTS}}


def differences(preset: str) -> str:
    """The values a preset sets that differ from the sandbox's Mutual-Taught."""
    base = C.PRESETS["sandbox"]
    diff = {k: v for k, v in C.PRESETS[preset].items() if base.get(k) != v}
    return " ".join(f"--{k} {v:.3g}" if isinstance(v, float) else f"--{k} {v}"
                    for k, v in diff.items())


@dataclass
class ReportConfig:
    run: str = ""  # one run directory: print its gold table
    seeds: str = "0,1,2"  # seeds of the comparison: comma-separated, ranges allowed (0-14)
    variants: str = ",".join(VARIANTS)  # comma-separated, of VARIANTS
    out: str = "runs/sandbox_report"  # where the comparison's runs and report go
    jobs: int = opt(1, above=0)  # runs at once, each its own process (one thread each)
    plot: bool = False  # also write each run's figures (eval/plot_run.py) to RUN/plots/*.png


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-14' or '0-4,10' -> the seeds, in order."""
    out = []
    try:
        for part in (p for p in text.split(",") if p):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise C.ConfigError(f"--seeds {text!r}: expected comma-separated integers or ranges, "
                            "e.g. 0-14. Fix: write the seeds like that") from None
    return out


def final_metrics(run: Path) -> dict:
    """The last finished iteration's policy gold numbers (the run's output policy)."""
    rows = [r for r in sandbox.gold_view(run) if "policy_gold" in r]
    last = rows[-1] if rows else {}
    return ({k: last.get(k, math.nan)
             for k in ("policy_gold", "policy_perfect", "gold_win_vs_pi0")}
            | {"iters_done": len(rows)})


def pseudo_counts(run: Path) -> list[dict]:
    """Per iteration: the pseudo-pairs the filter kept and dropped (by reason), and ε_t."""
    out = []
    for it in iteration_dirs(run):
        info_path = it / "pseudo_pairs.info.json"
        if info_path.is_file():
            info = read_json(info_path)
            dropped = {k: v for k, v in info.items()
                       if k not in ("kept", "kept_swapped") and isinstance(v, int)
                       and k not in ("n", "kept_total", "eps_rows")}
            out.append({"iter": it.relative_to(run).as_posix(), "eps_t": info["eps_t"],
                        "kept": info["kept_total"], "n": info["n"], "dropped": dropped})
    return out


# two-sided 95% t quantiles by degrees of freedom (no scipy here); beyond 30, the normal's 1.96
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
       18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def paired(diffs: list[float]) -> str:
    """mean difference and its 95% t-interval over seeds (a paired comparison: same worlds)."""
    xs = [d for d in diffs if not math.isnan(d)]
    if len(xs) < 2:
        return f"{xs[0]:+.3f} (1 seed)" if xs else "-"
    n, m = len(xs), statistics.mean(xs)
    t = T95.get(n - 1) or (T95[max(k for k in T95 if k <= n - 1)] if n - 1 <= 30 else 1.96)
    half = t * statistics.stdev(xs) / math.sqrt(n)
    return f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"


def run_all(seeds: list[int], variants: list[str], out: Path, jobs: int):
    """Every (variant, seed) as its own `python run_em.py` process, `jobs` at a time; a finished run
    is found done by its manifest, so an interrupted report resumes per (variant, seed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    todo = [(v, s) for s in seeds for v in variants]

    def one(vs):
        v, s = vs
        run = out / f"{v}-seed{s}"
        log = out / f"{v}-seed{s}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, str(REPO / "run_em.py"), "--preset", VARIANTS[v],
                                 "--seed", str(s), "--out", str(run)], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"{v} seed {s}: {'done' if rc == 0 else f'FAILED (exit {rc}, see {log})'}", flush=True)
        return rc
    with ThreadPoolExecutor(jobs) as pool:
        failed = [vs for vs, rc in zip(todo, pool.map(one, todo)) if rc != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed, e.g. {failed[:3]}; their logs are in {out}")


def compare(seeds: list[int], variants: list[str], out: Path, jobs: int = 1) -> str:
    """Run every variant on every seed (each a run_em.py run on the sandbox), then tabulate each
    variant's mean and its paired difference from Mutual-Taught on the same seeds (95% t-interval)."""
    run_all(seeds, variants, out, jobs)
    results = {v: [{"seed": s, **final_metrics(out / f"{v}-seed{s}"),
                    "pseudo": pseudo_counts(out / f"{v}-seed{s}")} for s in seeds] for v in variants}
    (out / "report.json").write_text(json.dumps(results, indent=2))
    keys = ("policy_gold", "policy_perfect", "gold_win_vs_pi0")

    def mean(v, k):
        xs = [r[k] for r in results[v] if not math.isnan(r[k])]
        return f"{statistics.mean(xs):.3f}" if xs else "-"

    def diff(v, k):
        if v == "mutual-taught" or "mutual-taught" not in results:
            return "—"
        mt = {r["seed"]: r[k] for r in results["mutual-taught"]}
        return paired([r[k] - mt[r["seed"]] for r in results[v]])
    cmd = f"python eval/sandbox_report.py --seeds {','.join(map(str, seeds))}"
    lines = [f"{len(seeds)} seeds ({','.join(map(str, seeds))}); `{cmd}`", "",
             "| variant | preset (differences) | paper | final policy gold | − Mutual-Taught "
             "[95% CI] | perfect share | gold win vs π0 | − Mutual-Taught [95% CI] |",
             "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        paper = C.VARIANTS[v][0] if v in C.VARIANTS else "Table 1 Mutual-Taught"
        lines.append(f"| {v} | `{VARIANTS[v]}` "
                     f"({differences(VARIANTS[v]) or 'the sandbox defaults'}) | {paper} | "
                     f"{mean(v, keys[0])} | {diff(v, keys[0])} | {mean(v, keys[1])} | "
                     f"{mean(v, keys[2])} | {diff(v, keys[2])} |")
    lines += ["", "Pseudo-pairs per iteration (seed " + str(seeds[0]) + "): kept / total, and the "
              "dropped by reason", "", "| variant | iteration | ε_t | kept / total | dropped |",
              "|---|---|---|---|---|"]
    for v in variants:
        for row in results[v][0]["pseudo"]:
            dropped = ", ".join(f"{k} {n}" for k, n in sorted(row["dropped"].items())) or "none"
            lines.append(f"| {v} | {row['iter']} | {row['eps_t']:.3f} | {row['kept']}/{row['n']} | "
                         f"{dropped} |")
    table = "\n".join(lines)
    (out / "report.md").write_text(table + "\n")
    return table


def main(argv=None):
    a = C.parse(sys.argv[1:] if argv is None else argv, ReportConfig(),
                "python eval/sandbox_report.py", __doc__)
    if a.run:
        print(sandbox.gold_table(sandbox.gold_view(Path(a.run))))
        for p in plot_run.plot_run(a.run) if a.plot else []:
            print(p)
        return
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise C.ConfigError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    seeds = parse_seeds(a.seeds)
    print(compare(seeds, variants, Path(a.out), a.jobs))
    for v in variants if a.plot else []:
        for s in seeds:
            for p in plot_run.plot_run(Path(a.out) / f"{v}-seed{s}"):
                print(p)


if __name__ == "__main__":
    dist.run(main)
