"""The gold view of sandbox runs, and Mutual-Taught against its baselines and ablations over seeds.

    # gold table of one run directory
    python eval/sandbox_report.py --run runs/mt
    # every variant x seed, mean ± std
    python eval/sandbox_report.py --seeds 0,1,2 --out runs/report
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
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

# `python eval/sandbox_report.py`: make `mt` importable from the repo root
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_em  # noqa: E402
from mt import config as C  # noqa: E402
from eval import plot_run  # noqa: E402
from mt import dist, sandbox  # noqa: E402

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
    seeds: str = "0,1,2"  # comma-separated seeds of the comparison
    variants: str = ",".join(VARIANTS)  # comma-separated, of VARIANTS
    out: str = "runs/sandbox_report"  # where the comparison's runs and report go
    plot: bool = False  # also write each run's figures (eval/plot_run.py) to RUN/plots/*.png


def final_metrics(run: Path) -> dict:
    """The last finished iteration's policy gold numbers (the run's output policy)."""
    rows = [r for r in sandbox.gold_view(run) if "policy_gold" in r]
    last = rows[-1] if rows else {}
    return ({k: last.get(k, math.nan)
             for k in ("policy_gold", "policy_perfect", "gold_win_vs_pi0")}
            | {"iters_done": len(rows)})


def compare(seeds: list[int], variants: list[str], out: Path) -> str:
    """Run every variant on every seed (each a run_em.py run on the sandbox)
    and tabulate mean ± std."""
    results: dict[str, list[dict]] = {}
    for v in variants:
        for s in seeds:
            run = out / f"{v}-seed{s}"
            run_em.main(["--preset", VARIANTS[v], "--seed", str(s), "--out", str(run)])
            results.setdefault(v, []).append({"seed": s, **final_metrics(run)})
    (out / "report.json").write_text(json.dumps(results, indent=2))

    def ms(v, k):
        xs = [r[k] for r in results[v] if not math.isnan(r[k])]
        if not xs:
            return "-"
        return (f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1
                else f"{xs[0]:.3f}")
    lines = [f"Seeds {seeds}; `python eval/sandbox_report.py --seeds {','.join(map(str, seeds))}`",
             "",
             "| variant | preset (differences) | paper | policy gold | perfect share | "
             "gold win vs π0 |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        paper = C.VARIANTS[v][0] if v in C.VARIANTS else "Table 1 Mutual-Taught"
        lines.append(f"| {v} | `{VARIANTS[v]}` "
                     f"({differences(VARIANTS[v]) or 'the sandbox defaults'}) | {paper} | "
                     f"{ms(v, 'policy_gold')} | {ms(v, 'policy_perfect')} | "
                     f"{ms(v, 'gold_win_vs_pi0')} |")
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
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        raise C.ConfigError(f"--seeds {a.seeds!r}: expected comma-separated integers, "
                            "e.g. 0,1,2") from None
    print(compare(seeds, variants, Path(a.out)))
    for v in variants if a.plot else []:
        for s in seeds:
            for p in plot_run.plot_run(Path(a.out) / f"{v}-seed{s}"):
                print(p)


if __name__ == "__main__":
    dist.run(main)  # compare() runs run_em.py in this process (a private gloo group)
