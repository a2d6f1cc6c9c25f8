"""Gold diagnostics of a sandbox run: per iteration, what the paper can only estimate.

    curve(...)     after model selection: gold, r_{t-1}'s score and drift from π_{t-1} at every
                   checkpoint (the over-optimisation curve)   -> iter*/gold_curve.json
    diagnose(...)  after the M-step: the Fig. 3 claim measured -- gold agreement of r0, r_{t-1}
                   and r_t on pairs of π_t's and π_{t-1}'s samples, best-of-n by each RM, and the
                   pseudo-pairs' gold accuracy, before and after the filter -> iter*/gold.json
    gold_view(run), gold_table(rows)   the per-iteration table run_em.py prints

run_em.py calls them through one object, Diagnostics, at the two places of Algorithm 1 they
measure (after model selection; after the M-step or at a τ stop); off a sandbox world it does
nothing.

Every number is computed from the run's files and the world's gold reward (mt/sandbox.py); the
pure functions below (agreement, best_of_n, auc, pseudo_report) are checked against hand values
in tests/test_gold.py.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

import torch

from mt import chat, dist
from mt import config as C
from mt.checkpoint import load_model
from mt.data import (read_json, read_pairs, read_prompts, read_pseudo_pairs, read_samples,
                     read_scores, write_json)
from mt.errors import UserError
from mt.logps import response_logps
from mt.manifest import Manifest, iteration_dir, iteration_dirs
from mt.sampler import sample_to_file
from mt.sandbox import gold_reward, gold_win_rate, is_world_prompts, pair_gold_accuracy, policy_gold
from mt.scoring import score_files
from mt.train import collate, metrics_summary

# ---- pure measures (hand-checked in tests/test_gold.py)


def agreement(samples: list[dict], scores: list[dict]) -> dict:
    """Share of within-prompt response pairs with different gold that the RM orders as gold does
    (an RM tie counts as disagreement); `n` pairs. Rows of `scores` align with `samples`."""
    by_id = {s["prompt_id"]: s["scores"] for s in scores}
    agree = n = 0
    for row in samples:
        ys, sc = row["responses"], by_id[row["prompt_id"]]
        g = [gold_reward(row["prompt"], y) for y in ys]
        for i in range(len(ys)):
            for j in range(i + 1, len(ys)):
                if g[i] == g[j]:
                    continue
                n += 1
                agree += (sc[i] > sc[j]) if g[i] > g[j] else (sc[j] > sc[i])
    return {"agreement": agree / n if n else math.nan, "n": n}


def best_of_n(samples: list[dict], scores: list[dict]) -> float:
    """Mean gold of the response the RM scores highest among each prompt's n (first on ties)."""
    by_id = {s["prompt_id"]: s["scores"] for s in scores}
    picks = []
    for row in samples:
        sc = by_id[row["prompt_id"]]
        j = max(range(len(sc)), key=lambda i: (sc[i], -i))
        picks.append(gold_reward(row["prompt"], row["responses"][j]))
    return statistics.mean(picks) if picks else math.nan


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a random `pos` value > a random `neg` value), ties counting one half (Mann-Whitney)."""
    if not pos or not neg:
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def pseudo_report(rows: list[dict]) -> dict:
    """Gold view of the pseudo-pairs of one iteration (rows of pseudo_pairs.jsonl).

    acc_before: gold accuracy of the label y_t ≻ y_{t-1} over the valid rows; acc_after: of the
    kept pairs' chosen ≻ rejected (dst may swap); auc: how well Δr separates right labels from
    wrong ones (0.5: the filter's statistic knows nothing); dropped: per reason, how many and
    their label's gold accuracy. Gold ties decide nothing and are left out of every accuracy.
    """
    def acc(pairs):
        return pair_gold_accuracy(pairs)["accuracy"] if pairs else math.nan
    valid = [r for r in rows if r["valid"]]
    raw = [{**r, "chosen": r["y_t"], "rejected": r["y_prev"]} for r in valid]
    decided = [(r["delta"], gold_reward(r["prompt"], r["y_t"]) - gold_reward(r["prompt"],
                                                                             r["y_prev"]))
               for r in valid]
    right = [d for d, g in decided if g > 0]
    wrong = [d for d, g in decided if g < 0]
    dropped = {}
    for reason in sorted({r["reason"] for r in rows if not r["kept"]}):
        out = [r for r in rows if not r["kept"] and r["reason"] == reason]
        dropped[reason] = {"n": len(out), "acc": acc([{**r, "chosen": r["y_t"],
                                                       "rejected": r["y_prev"]} for r in out])}
    return {"n": len(rows), "valid": len(valid), "kept": sum(r["kept"] for r in rows),
            "acc_before": acc(raw), "acc_after": acc([r for r in rows if r["kept"]]),
            "gold_ties": sum(g == 0 for _, g in decided) / max(1, len(decided)),
            "auc": auc(right, wrong), "dropped": dropped}


def oracle_pseudo_pairs(rows: list[dict], info: dict) -> tuple[list[dict], dict]:
    """The oracle M-step's pseudo-pairs (--sandbox.oracle_pseudo_labels; a positive control): the
    same filtered rows (em.filter_pseudo_pairs), relabelled by the gold reward.

    A valid, non-identical pair is kept with chosen = the response of higher gold (swapped when
    that is y_{t-1}); a gold tie has no label and is dropped ("gold_tie"), as dst drops an RM tie.
    The ε_t filter is not applied (it removes the labels r_{t-1} likely got wrong; gold's are
    right); its decision stays in filter_kept / filter_reason, and ε_t in `eps`, for comparison.
    """
    out, stats = [], Counter()
    for r in rows:
        g_t, g_prev = gold_reward(r["prompt"], r["y_t"]), gold_reward(r["prompt"], r["y_prev"])
        if not r["valid"]:
            keep, reason = False, "invalid_response"
        elif r["y_t"] == r["y_prev"]:
            keep, reason = False, "identical_text"
        elif g_t == g_prev:
            keep, reason = False, "gold_tie"
        else:
            keep, reason = True, "kept" if g_t > g_prev else "kept_swapped"
        swap = keep and g_t < g_prev
        chosen, rejected = (r["y_prev"], r["y_t"]) if swap else (r["y_t"], r["y_prev"])
        out.append({**r, "chosen": chosen, "rejected": rejected, "kept": keep, "swapped": swap,
                    "reason": reason, "gold_t": g_t, "gold_prev": g_prev,
                    "filter_kept": r["kept"], "filter_reason": r["reason"]})
        stats[reason] += 1
    keys = ("eps_t", "strategy", "eps_stat", "eps_mult", "eps_rows", "score_prev_std",
            "score_prev_var", "n")
    return out, {**{k: info[k] for k in keys}, "labels": "gold", **dict(stats),
                 "kept_total": sum(r["kept"] for r in out),
                 "filter_kept_total": info["kept_total"]}


# ---- the stages (run_em.py runs them on sandbox worlds)


@torch.no_grad()
def sequence_logps(policy_dir: Path, samples: list[dict], micro_batch_size: int = 64
                   ) -> dict[tuple[str, int], float]:
    """log π(y | x) summed over each finished response's tokens (end of turn included)."""
    tok = chat.load_tokenizer(policy_dir)
    model = load_model(policy_dir, "auto", dist.get().device).eval()
    keys, pairs = [], []
    for row in samples:
        for j, (y, why) in enumerate(zip(row["responses"], row["finish_reasons"])):
            if why == "stop" and y:
                keys.append((row["prompt_id"], j))
                pairs.append({"prompt_id": f"{row['prompt_id']}/{j}", "prompt": row["prompt"],
                              "chosen": y, "rejected": ""})
    examples, _ = chat.policy_examples(tok, pairs, max_length=10**6)
    out = {}
    dev = dist.model_device(model)
    for i in range(0, len(examples), micro_batch_size):
        chunk = examples[i:i + micro_batch_size]
        batch = collate(chunk, False, tok.pad_token_id or 0, dev)
        lp = response_logps(model, batch.ids, batch.loss_mask)
        out.update(zip(keys[i:i + micro_batch_size], lp.tolist()))
    return out


def drift(pi: Path, pi_prev: Path, samples: list[dict]) -> float:
    """Mean of log π(y|x) − log π_{t-1}(y|x) over π's own finished responses: a Monte Carlo
    estimate of KL(π || π_{t-1}) (the responses are drawn at the run's temperature and top-p,
    so it is the sequence log-ratio on the samples, not the exact KL)."""
    new, old = sequence_logps(pi, samples), sequence_logps(pi_prev, samples)
    return statistics.mean(new[k] - old[k] for k in new) if new else math.nan


def curve(out_path: Path, selection_path: Path, candidates: Path, pi_prev: Path) -> dict:
    """The over-optimisation curve of one E-step, from model selection's D_MS samples: per
    checkpoint, gold, the share of perfect answers, r_{t-1}'s mean score (what the E-step
    optimised), the Eq. 6 win rate and ties against π_{t-1}, and the drift from π_{t-1}."""
    sel = read_json(selection_path)
    d = selection_path.parent / "selection"
    steps = metrics_summary(candidates).get("steps")
    prev = read_samples(d / "prev.samples.jsonl")
    points = [{"checkpoint": "start", "step": 0, "gold": policy_gold(prev),
               "perfect": policy_gold(prev, perfect=True),
               "r_prev": _mean_score(d / "prev.scores.jsonl"), "drift": 0.0}]
    for k, rate in sel["candidates"].items():
        rows = read_samples(d / f"{k}.samples.jsonl")
        points.append({"checkpoint": k, "step": int(k.split("-")[1]) if k != "final" else steps,
                       "gold": policy_gold(rows), "perfect": policy_gold(rows, perfect=True),
                       "r_prev": _mean_score(d / f"{k}.scores.jsonl"),
                       "drift": drift(candidates / k, pi_prev, rows),
                       "win_rate": rate["win_rate"], "ties": rate["ties"] / rate["n"]})
    out = _json_safe({"curve": points, "chosen": sel.get("chosen")})
    if dist.get().is_main:
        write_json(out_path, out)
    return out


def _json_safe(x):
    """NaN (an accuracy over no pairs) -> None: JSON has no NaN, and None reads as "undefined"."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _mean_score(path: Path) -> float:
    return statistics.mean(s for r in read_scores(path) for s in r["scores"])


def diagnose(out_path: Path, pi_t: Path, pi_prev: Path, r0: Path, r_prev: Path, r_t: Path,
             d_ms: Path, pi0_samples: Path, sampling, n: int, seed: int, stream: str) -> dict:
    """After iteration t: π_t's and π_{t-1}'s n responses per D_MS prompt, scored by r0, r_{t-1}
    and r_t; their gold agreement on each policy's pairs, best-of-n by each RM judged by gold,
    the policy's gold and gold win rate against π0, and the gold view of the iteration's E-step
    pairs and pseudo-pairs (if any)."""
    it = out_path.parent
    rms = {"r0": r0, "r_prev": r_prev, "r_t": r_t}
    d = it / "gold"
    samples = {}
    for name, policy in (("pi_t", pi_t), ("pi_prev", pi_prev)):
        # the same stream for both: common random numbers
        tok = chat.load_tokenizer(policy)
        model = load_model(policy, "auto", dist.get().device).eval()
        sample_to_file(model, tok, read_prompts(d_ms), sampling, d / f"{name}.samples.jsonl",
                       seed=seed, stream=f"{stream}/gold", n=n,
                       stop_ids=chat.stop_ids(tok, policy), source=d_ms)
        samples[name] = read_samples(d / f"{name}.samples.jsonl")
    scores = {}
    for rm, path in rms.items():
        files = [(d / f"{name}.samples.jsonl", d / f"{name}.{rm}.scores.jsonl")
                 for name in samples]
        for name, rows in zip(samples, score_files(path, files)):
            scores[rm, name] = rows
    out = {"n_samples": n, "policy": {
        "gold": policy_gold(samples["pi_t"]), "perfect": policy_gold(samples["pi_t"], True),
        "prev_gold": policy_gold(samples["pi_prev"]),
        "gold_win_vs_pi0": gold_win_rate(samples["pi_t"], read_samples(pi0_samples))["win_rate"],
        "best_of_n_oracle": statistics.mean(max(gold_reward(r["prompt"], y)
                                                for y in r["responses"])
                                            for r in samples["pi_t"])}}
    for name in samples:
        out[f"agreement_{name}"] = {rm: agreement(samples[name], scores[rm, name]) for rm in rms}
    out["best_of_n"] = {rm: best_of_n(samples["pi_t"], scores[rm, "pi_t"]) for rm in rms}
    out["st_pairs_gold_acc"] = pair_gold_accuracy(read_pairs(it / "pairs.jsonl"))["accuracy"]
    if (it / "pseudo_pairs.jsonl").is_file():
        out["pseudo"] = pseudo_report(read_pseudo_pairs(it / "pseudo_pairs.jsonl"))
    out = _json_safe(out)
    if dist.get().is_main:
        write_json(out_path, out)
    return out


# ---- the two stages inside run_em.py's loop


def enabled(cfg: dict) -> bool:
    """Does a run measure gold? On a sandbox world's prompts (the gold reward applies) with
    --sandbox.diagnostics. From the config as config.json holds it, so `run_em.py status` decides
    as the run did."""
    return bool(cfg.get("sandbox", {}).get("diagnostics")) and is_world_prompts(cfg["prompts"])


class Diagnostics:
    """The gold stages of one run: `curve` after model selection, `diagnose` after the M-step (or
    at a τ stop, on the models the run keeps). Off a sandbox world (`on` false) both do nothing."""

    def __init__(self, m: Manifest, cfg: C.Config, on: bool, r0: Path, d_ms: Path):
        self.m, self.cfg, self.on, self.r0, self.d_ms = m, cfg, on, r0, d_ms
        # π0's responses on D_MS: sampled once, by the first iteration's model selection
        self.pi0_samples = (iteration_dir(Path(cfg.out), 1, 1, cfg.em.rounds) / "selection"
                            / "prev.samples.jsonl")

    def curve(self, tag: str, it: Path, pi_prev: Path):
        """The over-optimisation curve, before the unselected checkpoints are pruned."""
        if self.on:
            self.m.stage(f"{tag}/gold_curve", curve, [it / "gold_curve.json"],
                         out_path=it / "gold_curve.json", selection_path=it / "selection.json",
                         candidates=it / "policy", pi_prev=pi_prev)

    def diagnose(self, tag: str, it: Path, pi_t: Path, pi_prev: Path, r_prev: Path,
                 r_t: Path) -> dict:
        """Fig. 3 measured: the RMs' gold agreement on π_t. {"gold": ...} for the iteration's
        metrics, or {} when off."""
        if not self.on:
            return {}
        c = self.cfg
        self.m.stage(f"{tag}/gold", diagnose, [it / "gold.json"], out_path=it / "gold.json",
                     pi_t=pi_t, pi_prev=pi_prev, r0=self.r0, r_prev=r_prev, r_t=r_t,
                     d_ms=self.d_ms, pi0_samples=self.pi0_samples, sampling=c.sampling,
                     n=c.em.n_samples, seed=c.seed, stream=tag)
        return {"gold": {**read_json(it / "gold_curve.json"), **read_json(it / "gold.json")}}


# ---- the gold view of a run directory (what run_em.py prints after a sandbox run)


class NoGoldYet(UserError):
    """A run (or a directory) with no finished selection: nothing for gold to view yet."""


def gold_view(run: Path) -> list[dict]:
    """One row per iteration of a sandbox run directory with its gold numbers, from its files."""
    run = Path(run)
    its = iteration_dirs(run)
    if not its:
        raise NoGoldYet(f"{run}: no iteration directories, so no gold numbers yet. Fix: pass a "
                        "run_em.py --out directory whose first iteration has finished")
    first = its[0] / "selection" / "prev.samples.jsonl"  # π0 on D_MS, sampled once
    if not first.is_file():
        raise NoGoldYet(f"{first}: missing, so no gold numbers yet (the first selection has not "
                        "run). Fix: rerun the run's command to go on, or wait for it")
    pi0 = read_samples(first)
    rows = []
    for it in its:
        if not (it / "selection.json").is_file():
            break
        chosen = read_json(it / "selection.json").get("chosen")
        row = {"iter": it.relative_to(run).as_posix(), "chosen": chosen or "stop",
               "pi0_gold": policy_gold(pi0),
               # r_{t-1}'s E-step pairs (the ST pairs): how often the RM that drove this E-step
               # agreed with gold
               "estep_pairs_gold_acc": pair_gold_accuracy(
                   read_pairs(it / "pairs.jsonl"))["accuracy"]}
        if (it / "gold_curve.json").is_file():
            row["curve"] = read_json(it / "gold_curve.json")["curve"]
        if chosen:
            new = read_samples(it / "selection" / f"{chosen}.samples.jsonl")
            row["policy_gold"] = policy_gold(new)
            row["policy_perfect"] = policy_gold(new, perfect=True)
            row["gold_win_vs_pi0"] = gold_win_rate(new, pi0)["win_rate"]
        if (it / "gold.json").is_file():
            row["gold"] = read_json(it / "gold.json")
        if (it / "pseudo_pairs.jsonl").is_file():
            p = pseudo_report(read_pseudo_pairs(it / "pseudo_pairs.jsonl"))
            row.update(pseudo_gold_acc_before=p["acc_before"],
                       pseudo_gold_acc_after=p["acc_after"],
                       pseudo_auc=p["auc"], pseudo_kept=p["kept"], pseudo_total=p["n"])
        rows.append(row)
    return rows


def _f(x, fmt=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def gold_table(rows: list[dict]) -> str:
    """The gold view: per iteration, the policy, the RMs' gold agreement on π_t's samples, and
    the pseudo-pairs; then the over-optimisation curve of every E-step."""
    lines = ["| iter | chosen | policy gold (π0) | perfect | gold win vs π0 | ST pairs gold acc | "
             "gold agreement on π_t's pairs: r0 / r_{t-1} / r_t | best-of-n gold by r0 / r_t | "
             "pseudo gold acc before → after | Δr AUC | pseudo kept/total |",
             "|" + "---|" * 11]
    for r in rows:
        g = r.get("gold", {})
        a = g.get("agreement_pi_t", {})
        bon = g.get("best_of_n", {})
        agree = " / ".join(_f(a.get(k, {}).get("agreement")) for k in ("r0", "r_prev", "r_t"))
        lines.append(
            f"| {r['iter'].removeprefix('iter')} | {r['chosen']} | {_f(r.get('policy_gold'))} "
            f"({_f(r['pi0_gold'])}) | {_f(r.get('policy_perfect'), '.2f')} | "
            f"{_f(r.get('gold_win_vs_pi0'))} | {_f(r['estep_pairs_gold_acc'])} | {agree} | "
            f"{_f(bon.get('r0'))} / {_f(bon.get('r_t'))} | "
            f"{_f(r.get('pseudo_gold_acc_before'))} → {_f(r.get('pseudo_gold_acc_after'))} | "
            f"{_f(r.get('pseudo_auc'))} | "
            f"{r.get('pseudo_kept', '-')}/{r.get('pseudo_total', '-')} |")
    curves = [(r["iter"], r["curve"]) for r in rows if r.get("curve")]
    if curves:
        lines += ["", "| iter | checkpoint (step) | gold | perfect | r_{t-1} score | drift "
                  "(log-ratio vs π_{t-1}) | Eq. 6 win rate (ties) |", "|" + "---|" * 7]
        for tag, points in curves:
            for p in points:
                win = (f"{_f(p['win_rate'])} ({_f(p['ties'], '.2f')})" if "win_rate" in p
                       else "-")
                lines.append(f"| {tag.removeprefix('iter')} | {p['checkpoint']} ({p['step']}) | "
                             f"{_f(p['gold'])} | {_f(p['perfect'], '.2f')} | "
                             f"{_f(p['r_prev'], '.2f')} | {_f(p['drift'], '.2f')} | {win} |")
    return "\n".join(lines)
