"""Figures of one run directory, from its files alone (matplotlib, optional: `pip install
matplotlib`).

    python eval/plot_run.py runs/mt                 # PNGs in runs/mt/plots/
    python eval/plot_run.py --run runs/mt --out DIR

- dpo_steps.png: each iteration's DPO loss and implicit-reward accuracy per optimizer step
  (policy/metrics.jsonl), the chosen checkpoint marked;
- selection.png: every checkpoint's win rate against π_{t-1} on D_MS (Eq. 6) beside τ (Eq. 7);
- pseudo_pairs.png: the pseudo-pairs kept and dropped (by reason) and the histogram of their margin
  Δr with ±ε_t (Sec. 4.3);
- rm_accuracy.png: the RM's accuracy per iteration (training pairs, held-out pseudo-pairs) and, in
  a sandbox run, the gold reward's verdict beside it (mt/gold.py gold_view).

`python eval/sandbox_report.py --run RUN --plot` writes the same figures.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# `python eval/plot_run.py`: make `mt` importable from the repo root
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_policy  # noqa: E402
import train_rm  # noqa: E402
from mt import dist, flags  # noqa: E402
from mt import gold as gold_metrics  # noqa: E402
from mt.data import read_json, read_jsonl_rows, read_pseudo_pairs  # noqa: E402
from mt.errors import UserError  # noqa: E402
from mt.manifest import iteration_dirs, lock_run_dir  # noqa: E402

DPI = 110
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
# a pseudo-pair's decision (mt/em.py filter_pseudo_pairs) -> legend text, colour
REASONS = {"kept": ("kept", "tab:green"), "kept_swapped": ("kept, swapped (dst)", "tab:olive"),
           "lqf_low_quality": ("dropped: Δr ≤ −ε_t (lqf)", "tab:red"),
           "hqs_below_margin": ("dropped: Δr < ε_t (hqs)", "tab:pink"),
           "dst_tie": ("dropped: tie (dst)", "tab:purple"),
           "identical_text": ("dropped: y_t = y_{t-1}", "tab:gray"),
           "invalid_response": ("dropped: empty / truncated", "tab:brown")}


def _figure(*args, **kw):
    try:
        # optional: imported only when a figure is drawn (a Figure needs no GUI backend)
        from matplotlib import figure
    except ImportError:
        raise UserError("plots need matplotlib. Fix: pip install matplotlib") from None
    return figure.Figure(*args, **kw)


def _iters(run: Path) -> list[Path]:
    if not (run / "config.json").is_file():
        raise UserError(f"{run}: no config.json, so not a run directory. Fix: pass a run_em.py "
                        "--out")
    return iteration_dirs(run)


def _tag(run: Path, it: Path) -> str:
    return it.relative_to(run).as_posix()


def _step(name: str, steps: int) -> int:
    """ckpt-6 -> 6, final -> the stage's last step."""
    return int(name.split("-")[1]) if name.startswith("ckpt-") else steps


# ---- the data of each figure (tests compare these with the artifacts)


def dpo_series(run: Path) -> dict[str, dict]:
    """{iteration: {step, loss, accuracy, chosen_step}} from policy/metrics.jsonl."""
    out = {}
    for it in _iters(run):
        path = it / "policy" / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl_rows(path)
        sel = read_json(it / "selection.json") if (it / "selection.json").is_file() else {}
        chosen = sel.get("chosen")
        out[_tag(run, it)] = {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
                              "accuracy": [r.get("accuracy") for r in rows],
                              "chosen_step": _step(chosen, rows[-1]["step"]) if chosen else None}
    return out


def selection_series(run: Path) -> dict[str, dict]:
    """{iteration: {names, step, win_rate, tau, chosen, stop}} from selection.json."""
    out = {}
    for it in _iters(run):
        if not (it / "selection.json").is_file():
            continue
        sel = read_json(it / "selection.json")
        steps = train_policy.summary(it / "policy").get("steps", 0)
        names = list(sel.get("candidates", {}))
        out[_tag(run, it)] = {"names": names, "step": [_step(k, steps) for k in names],
                              "win_rate": [sel["candidates"][k]["win_rate"] for k in names],
                              "tau": sel.get("tau"), "chosen": sel.get("chosen"),
                              "stop": sel["stop"]}
    return out


def pseudo_series(run: Path) -> dict[str, dict]:
    """{iteration: {eps, counts by reason, delta by reason (valid rows)}}
    from pseudo_pairs.jsonl."""
    out = {}
    for it in _iters(run):
        if not (it / "pseudo_pairs.jsonl").is_file():
            continue
        rows = read_pseudo_pairs(it / "pseudo_pairs.jsonl")
        info = read_json(it / "pseudo_pairs.info.json")
        counts, delta = {}, {}
        for r in rows:
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
            if r["valid"]:
                delta.setdefault(r["reason"], []).append(r["delta"])
        out[_tag(run, it)] = {"eps": info["eps_t"], "counts": counts, "delta": delta,
                              "strategy": info["strategy"]}
    return out


def rm_series(run: Path, gold: bool = True) -> dict[str, dict]:
    """{iteration: accuracies} from rm/metrics.jsonl and rm_eval.json, and in a sandbox run the
    gold view's (mt/gold.py gold_view)."""
    cfg = read_json(run / "config.json")
    golds = {}
    if gold and str(cfg.get("preset", "")).startswith("sandbox"):
        try:
            golds = {r["iter"]: r for r in gold_metrics.gold_view(run)}
        except gold_metrics.NoGoldYet:  # a run that has not finished its first selection
            golds = {}
    out = {}
    for it in _iters(run):
        tag = _tag(run, it)
        if not (it / "rm" / "metrics.jsonl").is_file():
            continue
        ev = read_json(it / "rm_eval.json") if (it / "rm_eval.json").is_file() else {}
        row = {"train_acc": train_rm.summary(it / "rm").get("train_acc"),
               "heldout_acc_prev": ev.get("heldout_acc_prev"),
               "heldout_acc_new": ev.get("heldout_acc_new")}
        g = golds.get(tag, {})
        if golds:
            row.update(gold_estep=g.get("estep_pairs_gold_acc"),
                       gold_pseudo_before=g.get("pseudo_gold_acc_before"),
                       gold_pseudo_after=g.get("pseudo_gold_acc_after"))
        out[tag] = row
    return out


# ---- the figures


def plot_dpo(run: Path):
    data = dpo_series(run)
    if not data:
        return None
    fig = _figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for (tag, d), color in zip(data.items(), COLORS):
        ax_loss.plot(d["step"], d["loss"], "-o", ms=3, color=color, label=tag)
        acc = [(s, a) for s, a in zip(d["step"], d["accuracy"]) if a is not None]
        ax_acc.plot([s for s, _ in acc], [a for _, a in acc], "-o", ms=3, color=color, label=tag)
        if d["chosen_step"] in d["step"]:
            i = d["step"].index(d["chosen_step"])
            ax_loss.plot([d["chosen_step"]], [d["loss"][i]], "*", ms=14, color=color, mec="k",
                         label=f"{tag}: chosen checkpoint")
    ax_loss.set(title="DPO loss per optimizer step", xlabel="optimizer step",
                ylabel="DPO loss (nats per pair)")
    ax_acc.set(title="implicit-reward accuracy per step", xlabel="optimizer step",
               ylabel="share of the step's pairs with margin > 0", ylim=(-0.05, 1.05))
    ax_acc.axhline(0.5, ls=":", color="gray", label="chance (0.5)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{run.name}: E-step DPO (policy/metrics.jsonl)")
    return fig


def plot_selection(run: Path):
    data = selection_series(run)
    if not data:
        return None
    fig = _figure(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    tau = next((d["tau"] for d in data.values() if d["tau"] is not None), None)
    for (tag, d), color in zip(data.items(), COLORS):
        label = f"{tag}" + (" (τ stop)" if d["stop"] else f" (chose {d['chosen']})")
        ax.plot(d["step"], d["win_rate"], "-o", color=color, label=label)
        if d["chosen"] in d["names"]:
            i = d["names"].index(d["chosen"])
            ax.plot([d["step"][i]], [d["win_rate"][i]], "o", ms=14, mfc="none", mec=color,
                    mew=2)
    if tau is not None:
        ax.axhline(tau, ls="--", color="k", label=f"τ = {tau:g} (stop below)")
    ax.set(title="model selection: every checkpoint vs π_{t-1} on D_MS, judged by r_{t-1}",
           xlabel="checkpoint (optimizer step; the last is final/)",
           ylabel="win rate (share of D_MS prompts, Eq. 6)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="iteration (ring: chosen)", title_fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def plot_pseudo(run: Path):
    data = pseudo_series(run)
    if not data:
        return None
    n = len(data)
    fig = _figure(figsize=(4 + 4.5 * n, 4.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    bars, tags = axes[0], list(data)
    reasons = [r for r in REASONS if any(r in d["counts"] for d in data.values())]
    bottom = [0] * len(tags)
    for r in reasons:
        h = [data[t]["counts"].get(r, 0) for t in tags]
        bars.bar(tags, h, bottom=bottom, color=REASONS[r][1], label=REASONS[r][0])
        bottom = [b + x for b, x in zip(bottom, h)]
    bars.set(title="pseudo-pairs per iteration", xlabel="iteration",
             ylabel="pseudo-pairs (prompts of D_R)")
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    for ax, tag in zip(axes[1:], tags):
        d = data[tag]
        present = [r for r in reasons if d["delta"].get(r)]
        if present:
            ax.hist([d["delta"][r] for r in present], bins=30, stacked=True,
                    color=[REASONS[r][1] for r in present],
                    label=[f"{REASONS[r][0]} ({len(d['delta'][r])})" for r in present])
        for x, lab in ((-d["eps"], f"±ε_t = ±{d['eps']:.3g}"), (d["eps"], None)):
            ax.axvline(x, ls="--", color="k", label=lab)
        ax.set(title=f"{tag}: Δr of the valid pseudo-pairs ({d['strategy']})",
               xlabel="Δr = r_{t-1}(y_t) − r_{t-1}(y_{t-1}) (RM score units)",
               ylabel="pseudo-pairs")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.yaxis.get_major_locator().set_params(integer=True)
    return fig


RM_BARS = (  # key -> legend text, colour, hatch (gold: hatched)
    ("train_acc", "r_t on its training pairs (last epoch)", "tab:blue", ""),
    ("heldout_acc_prev", "r_{t-1} on held-out pseudo-pairs", "tab:gray", ""),
    ("heldout_acc_new", "r_t on held-out pseudo-pairs", "tab:orange", ""),
    ("gold_estep", "gold: r_{t-1} agrees on π_{t-1}'s E-step pairs", "tab:green", "//"),
    ("gold_pseudo_before", "gold: pseudo-pair labels before filter", "tab:purple", "//"),
    ("gold_pseudo_after", "gold: pseudo-pair labels after filter", "tab:red", "//"),
)


def plot_rm(run: Path, gold: bool = True):
    data = rm_series(run, gold)
    if not data:
        return None
    keys = [b for b in RM_BARS if any(d.get(b[0]) is not None for d in data.values())]
    fig = _figure(figsize=(11, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    tags, w = list(data), 0.8 / max(1, len(keys))
    for j, (key, label, color, hatch) in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * w for i in range(len(tags))]
        hs = [data[t].get(key) for t in tags]
        b = ax.bar([x for x, h in zip(xs, hs) if h is not None], [h for h in hs if h is not None],
                   w, color=color, hatch=hatch, edgecolor="white" if not hatch else "k",
                   label=label)
        ax.bar_label(b, fmt="%.2f", fontsize=7)
    ax.axhline(0.5, ls=":", color="gray", label="chance (0.5)")
    ax.set_xticks(range(len(tags)), tags)
    ax.set(title="reward model accuracy per iteration (M-step)", xlabel="iteration t",
           ylabel="accuracy (share of pairs ranked right)", ylim=(0, 1.05))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


PLOTS = {"dpo_steps": plot_dpo, "selection": plot_selection, "pseudo_pairs": plot_pseudo,
         "rm_accuracy": plot_rm}


def plot_run(run, out=None, gold: bool = True) -> list[Path]:
    """Every figure of `run` with data, as PNGs in `out` (default RUN/plots)."""
    run = Path(run)
    out = Path(out) if out else run / "plots"
    _iters(run)
    _figure()  # fail here, before anything is read, when matplotlib is missing
    # one plotter per folder (it may be inside a live run: plotting one as it goes is fine)
    lock_run_dir(out, inside_live_run=True)
    figs = {name: fn(run, gold) if name == "rm_accuracy" else fn(run)
            for name, fn in PLOTS.items()}  # every file read (and checked) before any is written
    written = []
    for name, fig in figs.items():
        if fig is None:
            continue  # nothing of this kind yet (e.g. no M-step in a fixed-RM run)
        path = out / f"{name}.png"
        fig.savefig(path)
        written.append(path)
    return written


@dataclass
class PlotConfig:
    run: str = ""  # the run directory (also the first argument: python eval/plot_run.py RUN)
    out: str = ""  # where the PNGs go; "" = RUN/plots
    gold: bool = True  # sandbox runs: the gold reward's numbers beside the RM's


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--run", *argv]
    a = flags.parse(argv, PlotConfig(), "python eval/plot_run.py", __doc__)
    if not a.run:
        raise flags.ConfigError("python eval/plot_run.py: missing the run directory (RUN or --run)")
    for p in plot_run(a.run, a.out or None, a.gold):
        print(p)


if __name__ == "__main__":
    dist.run(main)
