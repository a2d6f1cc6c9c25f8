"""The decisions of Algorithm 1, as pure functions: partition, pairs, selection,
ε_t, filtering, mixing.

Everything here works on plain rows (dicts, as in the JSONL files) and numbers, so each rule is
tested by hand and reads next to the paper. The stages that produce the rows (sampling, scoring,
training) live in train_policy.py, train_rm.py and mt/scoring.py; run_em.py strings them together.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter

# ---- partition (Alg. 1 line 2)


def _rank_key(seed: int, prompt_id: str) -> str:
    return hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()


def partition(prompt_ids: list[str], iters: int, rm_fraction: float, d_ms_size: int, seed: int,
              rounds: int = 1) -> dict[str, list[str]]:
    """Split prompt ids into D_MS, D_R and D_1..D_T (per round), deterministically from the seed.

    Prompts are ordered by a hash of (seed, id), not by file position, so the split is stable
    across restarts and file orderings. D_MS (the fixed model-selection set) is drawn first
    (appendix B); the rest goes rm_fraction to D_R and equal parts to D_1..D_T (Sec. 5.1: three
    equal parts for T=2). With several rounds (Sec. 5.3) every round reuses the same partition.
    """
    if len(set(prompt_ids)) != len(prompt_ids):
        raise ValueError("partition: prompt ids must be unique")
    order = sorted(prompt_ids, key=lambda i: _rank_key(seed, i))
    if d_ms_size >= len(order):
        raise ValueError(f"--em.d_ms_size={d_ms_size} leaves no prompts for training: the prompt "
                         f"set has {len(order)} prompts. Fix: lower --em.d_ms_size or use more "
                         "prompts")
    d_ms, rest = order[:d_ms_size], order[d_ms_size:]
    n_r = round(len(rest) * rm_fraction)
    d_r, policy = rest[:n_r], rest[n_r:]
    parts = {"D_MS": d_ms, "D_R": d_r}
    for t in range(iters):
        parts[f"D_{t + 1}"] = policy[t * len(policy) // iters:(t + 1) * len(policy) // iters]
    empty = [k for k, v in parts.items()
             if not v and not (k == "D_MS" and d_ms_size == 0)
             and not (k == "D_R" and rm_fraction == 0)]
    if empty:
        raise ValueError(f"partition: {', '.join(empty)} would be empty with {len(prompt_ids)} "
                         f"prompts, --iters {iters}, --em.rm_fraction {rm_fraction}, "
                         f"--em.d_ms_size {d_ms_size}: Fix: use more prompts or smaller sets")
    return parts


# ---- E-step preference pairs (appendix B "Length control")


def valid_responses(sample: dict, keep_truncated: bool = False) -> list[int]:
    """Indices of responses usable in a pair: non-empty, and finished (unless keep_truncated).

    A truncated response hit the length cap without a stop token; it is excluded rather than given
    an EOS it never produced (DESIGN.md §4).
    """
    out = []
    for i, (text, reason) in enumerate(zip(sample["responses"], sample["finish_reasons"])):
        if not text.strip():
            continue
        if reason == "length" and not keep_truncated:
            continue
        out.append(i)
    return out


def choose_pair(scores: list[float], lengths: list[int], valid: list[int], rule: str):
    """(chosen index, rejected index) or (None, reason).

    length_control (appendix B): among responses scoring strictly above the prompt's mean (over the
    valid responses), the shortest is chosen (ties: higher score, then earlier); the lowest-scoring
    one is rejected (ties: earlier). max_min: highest vs lowest score.
    """
    if len(valid) < 2:
        return None, "too_few_valid"
    s = {i: scores[i] for i in valid}
    if max(s.values()) == min(s.values()):
        return None, "all_equal_scores"
    rejected = min(valid, key=lambda i: (s[i], i))
    if rule == "max_min":
        chosen = min(valid, key=lambda i: (-s[i], i))
    elif rule == "length_control":
        mean = sum(s.values()) / len(s)
        above = [i for i in valid if s[i] > mean]
        chosen = min(above, key=lambda i: (lengths[i], -s[i], i))
    else:
        raise ValueError(f"pair rule {rule!r}: must be length_control or max_min")
    return chosen, rejected


def make_pairs(samples: list[dict], scores: list[dict], rule: str = "length_control",
               keep_truncated: bool = False) -> tuple[list[dict], Counter]:
    """One (chosen, rejected) pair per prompt from its M scored responses,
    with the drop reasons counted."""
    by_id = {s["prompt_id"]: s["scores"] for s in scores}
    extra = set(by_id) - {s["prompt_id"] for s in samples}
    if extra:
        raise ValueError("make_pairs: the scores hold prompt ids the samples do not, e.g. "
                         f"{sorted(extra)[:3]}: they were made for another samples file")
    pairs, stats = [], Counter()
    for sample in samples:
        pid = sample["prompt_id"]
        if pid not in by_id:
            raise ValueError(f"make_pairs: prompt {pid!r} has samples but no scores")
        sc = by_id[pid]
        if len(sc) != len(sample["responses"]):
            raise ValueError(f"make_pairs: prompt {pid!r} has {len(sample['responses'])} "
                             f"responses but {len(sc)} scores")
        stats["responses"] += len(sc)
        stats["empty_responses"] += sum(not r.strip() for r in sample["responses"])
        stats["truncated_responses"] += sum(f == "length" for f in sample["finish_reasons"])
        valid = valid_responses(sample, keep_truncated)
        c, r = choose_pair(sc, sample["num_tokens"], valid, rule)
        if c is None:
            stats[f"dropped_{r}"] += 1
            continue
        if sample["responses"][c] == sample["responses"][r]:
            stats["dropped_identical_text"] += 1
            continue
        pairs.append({"prompt_id": pid, "prompt": sample["prompt"],
                      "chosen": sample["responses"][c], "rejected": sample["responses"][r],
                      "chosen_score": sc[c], "rejected_score": sc[r],
                      "chosen_index": c, "rejected_index": r})
    stats["prompts"] = len(samples)
    stats["pairs"] = len(pairs)
    return pairs, stats


# ---- model selection (Eq. 6-7)


def win_rate(new_scores: list[float], old_scores: list[float], tie_credit: float = 0.0) -> dict:
    """Eq. 6: a win only if r(y_new) > r(y_old) strictly; ties and losses are not wins.

    tie_credit (--em.tie_credit) counts a tie as that much of a win: 0 is Eq. 6 as written, 0.5 an
    analysis option. wins and ties are recorded apart, so either rate can be recomputed."""
    assert len(new_scores) == len(old_scores) and new_scores, (
        "win_rate needs aligned, non-empty scores")
    wins = sum(a > b for a, b in zip(new_scores, old_scores))
    ties = sum(a == b for a, b in zip(new_scores, old_scores))
    n = len(new_scores)
    rate = (wins + tie_credit * ties) / n if tie_credit else wins / n
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "n": n, "win_rate": rate}


def select_checkpoint(win_rates: dict[str, float], tau: float, select: bool = True,
                      order: list[str] | None = None) -> dict:
    """Eq. 7: argmax_k w_t^k (ties: the earliest checkpoint, the least drift); stop if max < τ.

    With select=False (ablation "w/o MS", Fig. 6) the last checkpoint is taken
    and there is no stop.
    """
    order = order or list(win_rates)
    if not select:
        return {"chosen": order[-1], "win_rate": win_rates.get(order[-1]), "stop": False}
    best = max(order, key=lambda k: (win_rates[k], -order.index(k)))
    stop = win_rates[best] < tau
    return {"chosen": None if stop else best, "best": best, "win_rate": win_rates[best],
            "stop": stop, "tau": tau}


# ---- data filtering for the M-step (Sec. 4.3, appendix F)


def spread(old_scores: list[float]) -> dict:
    """The spread of r_{t-1}(y_{t-1}): population variance (ddof=0)
    and standard deviation, over n rows."""
    n = len(old_scores)
    if n == 0:
        raise ValueError("ε_t needs at least one valid pseudo-pair (every y_t or y_{t-1} was "
                         "empty or truncated)")
    mean = sum(old_scores) / n
    var = sum((x - mean) ** 2 for x in old_scores) / n
    return {"n": n, "mean": mean, "var": var, "std": math.sqrt(var)}


def epsilon(old_scores: list[float], stat: str = "std", mult: float = 2.0) -> float:
    """ε_t from the spread of r_{t-1}(y_{t-1}) over the valid rows of D_R.

    Sec. 4.3 defines ε_t = sqrt(Var), in the units of Δr (Eq. 8); appendix B searched 1, 2 and 3
    times and used twice: the default is 2σ, so rescaling an RM's scores never changes a decision.
    stat="var" is the literal appendix-B wording (2 × the variance: score² against a score).
    """
    s = spread(old_scores)
    if stat not in ("std", "var"):
        raise ValueError(f"--em.eps_stat={stat!r}: must be std or var")
    return mult * s[stat]


def filter_decision(delta: float, eps: float, strategy: str) -> tuple[bool, bool, str]:
    """(keep, swap, reason) for one pseudo-pair with margin Δr = r(y_t) − r(y_{t-1}) (Eq. 8).

    lqf: drop the confidently wrong, Δr ≤ −ε (Sec. 4.3); −ε < Δr < 0 stays as regularisation.
    hqs: keep only Δr ≥ ε. dst: keep all, labelled by the sign of Δr (ties have no label: dropped).
    none: keep all as (y_t ≻ y_{t-1}).
    """
    if strategy == "lqf":
        return (False, False, "lqf_low_quality") if delta <= -eps else (True, False, "kept")
    if strategy == "hqs":
        return (True, False, "kept") if delta >= eps else (False, False, "hqs_below_margin")
    if strategy == "dst":
        if delta == 0:
            return False, False, "dst_tie"
        return (True, False, "kept") if delta > 0 else (True, True, "kept_swapped")
    if strategy == "none":
        return True, False, "kept"
    raise ValueError(f"--em.filter={strategy!r}: must be lqf, hqs, dst or none")


def make_pseudo_pairs(new: list[dict], old: list[dict], new_scores: list[dict],
                      old_scores: list[dict], keep_truncated: bool = False) -> list[dict]:
    """Alg. 1 line 6: (y_t ≻ y_{t-1}) per prompt of D_R
    with its margin Δr = r_{t-1}(y_t) − r_{t-1}(y_{t-1}).

    `new`/`old` are samples rows with one response each, from π_t and π_{t-1}. A prompt where
    either response is empty or truncated is marked invalid (it gets no pair, and is counted).
    """
    s_new = {s["prompt_id"]: s["scores"][0] for s in new_scores}
    s_old = {s["prompt_id"]: s["scores"][0] for s in old_scores}
    old_by_id = {o["prompt_id"]: o for o in old}
    rows = []
    for n in new:
        pid = n["prompt_id"]
        o = old_by_id[pid]
        rows.append({"prompt_id": pid, "prompt": n["prompt"], "y_t": n["responses"][0],
                     "y_prev": o["responses"][0], "score_t": s_new[pid], "score_prev": s_old[pid],
                     "delta": s_new[pid] - s_old[pid],
                     "valid": bool(valid_responses(n, keep_truncated)
                                   and valid_responses(o, keep_truncated))})
    return rows


def filter_pseudo_pairs(rows: list[dict], strategy: str, eps_stat: str,
                        eps_mult: float) -> tuple[list[dict], dict]:
    """Alg. 1 line 7: ε_t from r_{t-1}(y_{t-1}) over D_R, then each pair's decision
    (Sec. 4.3, appendix F).

    Every row keeps Δr, ε_t, its decision and why; only rows with kept=True enter the M-step, with
    chosen/rejected set (swapped for a dst pair with Δr < 0).
    """
    # σ over the rows whose y_{t-1} could be compared at all
    # (both responses valid), not over every row
    old = [r["score_prev"] for r in rows if r["valid"]]
    sp = spread(old)
    eps = epsilon(old, eps_stat, eps_mult)
    out, stats = [], Counter()
    for r in rows:
        if not r["valid"]:
            keep, swap, reason = False, False, "invalid_response"
        else:
            keep, swap, reason = filter_decision(r["delta"], eps, strategy)
        if keep and r["y_t"] == r["y_prev"]:
            keep, reason = False, "identical_text"
        chosen, rejected = (r["y_prev"], r["y_t"]) if swap else (r["y_t"], r["y_prev"])
        out.append({**r, "chosen": chosen, "rejected": rejected, "eps": eps, "kept": keep,
                    "swapped": swap, "reason": reason})
        stats[reason] += 1
    stats["kept_total"] = sum(r["kept"] for r in out)
    return out, {"eps_t": eps, "strategy": strategy, "eps_stat": eps_stat, "eps_mult": eps_mult,
                 "eps_rows": sp["n"], "score_prev_std": sp["std"], "score_prev_var": sp["var"],
                 "n": len(out), **dict(stats)}


# ---- the M-step's data (Sec. 5.1, 5.3)


def mix_rm_data(pseudo_pairs: list[dict], st_pairs: list[dict], mode: str) -> list[dict]:
    """pc: the kept pseudo-pairs (policy comparison); st: the E-step pairs of D_1..D_t with the
    labels the RM gave them (self-training); mixed (the paper's final setting): both."""
    pc = [p for p in pseudo_pairs if p["kept"]]
    if mode == "pc":
        return pc
    if mode == "st":
        return list(st_pairs)
    if mode == "mixed":
        return pc + list(st_pairs)
    raise ValueError(f"--em.rm_data={mode!r}: must be mixed, pc or st")
