"""The gold view of sandbox runs, and Mutual-Taught against its baselines and ablations over seeds.

    python eval/sandbox_report.py --run runs/mt                       # gold table of one run directory
    python eval/sandbox_report.py --seeds 0 1 2 --out runs/report     # every variant x seed, mean ± std

In the sandbox the gold reward is known, so we measure what the paper can only estimate: the policy's
gold reward, its gold win rate against π0, the RM's agreement with gold on pairs from the current
policy, and the gold accuracy of the pseudo-pairs before and after filtering.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python eval/sandbox_report.py`: make `mt` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mt import sandbox  # noqa: E402
from mt.data import read_jsonl_rows  # noqa: E402

# variant -> run_em flags (on top of the sandbox preset); the same prompt budget for all (Sec. 5, Table 1)
VARIANTS = {
    "mutual_taught": [],
    "iterative_dpo_fixed_rm": ["--em.update_rm", "false"],
    "offline_dpo": ["--iters", "1", "--em.update_rm", "false", "--em.select", "false"],
    "filter_hqs": ["--em.filter", "hqs"],  # Fig. 7
    "filter_dst": ["--em.filter", "dst"],
    "no_filter": ["--em.filter", "none"],  # Fig. 6 "w/o DF"
    "no_selection": ["--em.select", "false"],  # Fig. 6 "w/o MS"
    "rm_data_pc": ["--em.rm_data", "pc"],  # Fig. 4
    "rm_data_st": ["--em.rm_data", "st"],
}


def iteration_dirs(run: Path) -> list[Path]:
    return sorted((p for p in run.glob("iter*") if p.is_dir()), key=lambda p: int(p.name[4:]))


def gold_view(run: Path) -> list[dict]:
    """One row per finished iteration of a sandbox run directory, from its artifacts alone."""
    run = Path(run)
    its = iteration_dirs(run)
    if not its:
        raise FileNotFoundError(f"{run}: no iter*/ directories: not a run_em.py run directory")
    pi0 = read_jsonl_rows(its[0] / "selection" / "prev.samples.jsonl")  # π0 on D_MS, sampled once
    rows = []
    for it in its:
        sel_file = it / "selection.json"
        if not sel_file.is_file():
            break
        sel = json.loads(sel_file.read_text())
        chosen = sel.get("chosen")
        row = {"iter": int(it.name[4:]), "chosen": chosen or "stop",
               "pi0_gold": sandbox.policy_gold(pi0),
               # r_{t-1}'s pairs on π_{t-1}'s samples: how often the RM that drove this E-step agreed with gold
               "estep_pairs_gold_acc": sandbox.pair_gold_accuracy(read_jsonl_rows(it / "pairs.jsonl"))["accuracy"]}
        if chosen:
            new = read_jsonl_rows(it / "selection" / f"{chosen}.samples.jsonl")
            row["policy_gold"] = sandbox.policy_gold(new)
            row["policy_perfect"] = sandbox.policy_gold(new, perfect=True)
            row["gold_win_vs_pi0"] = sandbox.gold_win_rate(new, pi0)["win_rate"]
        pp_file = it / "pseudo_pairs.jsonl"
        if pp_file.is_file():
            pp = read_jsonl_rows(pp_file)
            valid = [{**r, "chosen": r["y_t"], "rejected": r["y_prev"]} for r in pp if r["valid"]]
            kept = [r for r in pp if r["kept"]]
            row["pseudo_gold_acc_before"] = sandbox.pair_gold_accuracy(valid)["accuracy"] if valid else math.nan
            row["pseudo_gold_acc_after"] = sandbox.pair_gold_accuracy(kept)["accuracy"] if kept else math.nan
            row["pseudo_kept"], row["pseudo_total"] = len(kept), len(pp)
        rows.append(row)
    return rows


def _f(x, fmt=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def gold_table(rows: list[dict]) -> str:
    lines = ["| iter | chosen | policy gold (π0) | perfect share | gold win vs π0 | E-step pairs gold acc "
             "| pseudo gold acc before → after filter | pseudo kept/total |", "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['iter']} | {r['chosen']} | {_f(r.get('policy_gold'))} ({_f(r['pi0_gold'])}) | "
            f"{_f(r.get('policy_perfect'), '.2f')} | {_f(r.get('gold_win_vs_pi0'))} | {_f(r['estep_pairs_gold_acc'])} | "
            f"{_f(r.get('pseudo_gold_acc_before'))} → {_f(r.get('pseudo_gold_acc_after'))} | "
            f"{r.get('pseudo_kept', '-')}/{r.get('pseudo_total', '-')} |")
    return "\n".join(lines)


def final_metrics(run: Path) -> dict:
    """The last finished iteration's policy gold numbers (the run's output policy)."""
    rows = [r for r in gold_view(run) if "policy_gold" in r]
    last = rows[-1] if rows else {}
    return {k: last.get(k, math.nan) for k in ("policy_gold", "policy_perfect", "gold_win_vs_pi0")} | {
        "iters_done": len(rows)}


def compare(seeds: list[int], variants: list[str], out: Path) -> str:
    """Run every variant on every seed (each a run_em.py run on the sandbox) and tabulate mean ± std."""
    import run_em
    results: dict[str, list[dict]] = {}
    for v in variants:
        for s in seeds:
            run = out / f"{v}-seed{s}"
            run_em.main(["--preset", "sandbox", "--seed", str(s), "--out", str(run), *VARIANTS[v]])
            results.setdefault(v, []).append({"seed": s, **final_metrics(run)})
    (out / "report.json").write_text(json.dumps(results, indent=2))

    def ms(v, k):
        xs = [r[k] for r in results[v] if not math.isnan(r[k])]
        if not xs:
            return "-"
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    lines = [f"Seeds {seeds}; `python eval/sandbox_report.py --seeds {' '.join(map(str, seeds))}`", "",
             "| variant | flags | policy gold | perfect share | gold win vs π0 |", "|---|---|---|---|---|"]
    for v in variants:
        lines.append(f"| {v} | `{' '.join(VARIANTS[v]) or '(defaults)'}` | {ms(v, 'policy_gold')} | "
                     f"{ms(v, 'policy_perfect')} | {ms(v, 'gold_win_vs_pi0')} |")
    table = "\n".join(lines)
    (out / "report.md").write_text(table + "\n")
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="one run directory: print its gold table")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=Path("runs/sandbox_report"))
    a = ap.parse_args(argv)
    if a.run:
        print(gold_table(gold_view(a.run)))
        return
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    print(compare(a.seeds, a.variants.split(","), a.out))


if __name__ == "__main__":
    from mt import dist
    dist.run(main)  # compare() runs run_em.py in this process (a private gloo group)
