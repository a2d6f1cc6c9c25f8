"""Mutual-Taught (Algorithm 1): co-adapt a policy and its reward model, EM-style.

    python run_em.py                                        # the gold-reward sandbox, CPU, minutes
    python run_em.py --preset paper --policy DIR --rm DIR --prompts FILE --out runs/mt
    torchrun --nproc_per_node 8 run_em.py --policy DIR --rm DIR --prompts FILE --iters 2
    python run_em.py STAGE --file-args ... [--section.key value ...]  # one stage on explicit files
    python run_em.py status --out runs/mt      # stages done, running or left; decisions so far

Every stage reads and writes files (DESIGN.md §2) and is recorded in <out>/manifest.json with the
hashes of its inputs and outputs and the arguments it ran with (mt/manifest.py). Rerunning the same
command skips finished stages and redoes an unfinished one; a different config is refused (naming
the keys) unless --force_config is given. `--help` lists every flag.
"""
from __future__ import annotations

import sys
from pathlib import Path

import train_policy
import train_rm
from mt import chat
from mt import config as C
from mt import dist, em, gold, hub, sandbox, track
from mt import plan as mt_plan
from mt.checkpoint import read_config
from mt.data import (read_json, read_pairs, read_prompts, read_pseudo_pairs, read_samples,
                     read_scores, write_json, write_jsonl)
from mt.manifest import Manifest, hold_run_dir, iteration_dir, iteration_stages
from mt.scoring import score_files
from mt.status import status_main

# ---- Algorithm 1


def run(cfg: C.Config) -> dict:
    d = dist.init_from(cfg)
    run_dir, E, config = Path(cfg.out), cfg.em, C.to_dict(cfg)  # config: what config.json holds
    preflight(cfg)  # every check that can fail runs before config.json is written
    m = Manifest(run_dir, cfg, cfg.force_config)
    track.start(cfg.log, run_dir, config)  # --log.tensorboard / --log.wandb (rank 0)
    pi0, r0 = Path(cfg.policy), Path(cfg.rm)  # line 1

    # line 2: partition D into D_1..D_T, D_R and the fixed D_MS (by prompt id, from the seed)
    split = {k: run_dir / "splits" / f"{k}.jsonl"
             for k in ["D_MS", "D_R"] + [f"D_{t}" for t in range(1, cfg.iters + 1)]}
    m.stage("splits", write_splits, list(split.values()), prompts_path=Path(cfg.prompts),
            out_dir=run_dir / "splits", iters=cfg.iters,
            rm_fraction=E.rm_fraction if E.update_rm else 0.0, d_ms_size=E.d_ms_size,
            seed=cfg.seed)
    D_ms, D_r = split["D_MS"], split["D_R"]

    # a sandbox world knows the truth: measure what the paper can only estimate (elsewhere a no-op)
    gold_diag = gold.Diagnostics(m, cfg, gold.enabled(config), r0, D_ms)
    history = []
    gen_pi, gen_r = pi0, r0  # the models that generate and judge the data of the next iteration
    first_pairs = iteration_dir(run_dir, 1, 1, E.rounds) / "pairs.jsonl"  # judged by r0
    for rnd in range(1, E.rounds + 1):
        # Sec. 5.3: a new round starts both models from the base models; the previous round's
        # models only generate and judge its first iteration's data
        init_pi, st_pairs, stop = pi0, [], False
        for t in range(1, cfg.iters + 1):  # line 3
            it = iteration_dir(run_dir, rnd, t, E.rounds)
            tag, D_t = it.relative_to(run_dir).as_posix(), split[f"D_{t}"]

            # line 4, E-step: checkpoints {π'_t} by DPO (Eq. 4) from π_{t-1}'s samples on D_t,
            # judged by r_{t-1}
            e_step(m, cfg, tag, it, D_t, pi_prev=gen_pi, r_prev=gen_r, init_pi=init_pi)
            st_pairs.append(it / "pairs.jsonl")

            # line 5, model selection (Eq. 6-7): every checkpoint vs π_{t-1} on D_MS, by r_{t-1};
            # --em.round_ref pi0: a later round's first iteration against the policy DPO began from
            ref = init_pi if E.round_ref == "pi0" else gen_pi
            m.stage(f"{tag}/select", select, [it / "selection.json"],
                    out_path=it / "selection.json", candidates=it / "policy", pi_prev=ref,
                    r_prev=gen_r, d_ms=D_ms, sampling=cfg.sampling, tau=E.tau, select=E.select,
                    seed=cfg.seed, stream=tag, **tie_args(E))
            gold_diag.curve(tag, it, pi_prev=ref)  # before unselected checkpoints go
            selection = read_json(it / "selection.json")
            metrics = {"round": rnd, "iter": t, "pairs": read_json(it / "pairs.stats.json"),
                       "dpo": train_policy.summary(it / "policy"), "selection": selection}
            history.append(metrics)
            if selection["stop"]:  # the run keeps π_{t-1} and r_{t-1}: measure what it keeps
                metrics.update(gold_diag.diagnose(tag, it, pi_t=gen_pi, pi_prev=gen_pi,
                                                  r_prev=gen_r, r_t=gen_r))
                end_iteration(m, config, gold_diag.on, tag, it, metrics, len(history))
                then = "end the run" if E.on_stop == "end" else "go on with them"
                dist.print0(f"{tag}: best win rate {selection['win_rate']:.3f} < τ={E.tau}: stop, "
                            f"keep π_{t - 1}, r_{t - 1} and {then} (--em.on_stop {E.on_stop})")
                if E.on_stop == "skip":  # this iteration halts; the next one starts from them
                    continue
                stop = True
                break
            pi_t = it / "policy" / selection["chosen"]
            if E.keep_checkpoints == "selected":  # the others are never read again
                m.prune(f"{tag}/prune", [it / "policy" / k for k in selection["candidates"]
                                         if k != selection["chosen"]])

            # lines 6-8: pseudo-pairs on D_R, filtered by ε_t, M-step (Eq. 5)
            r_t = gen_r  # without --em.update_rm r_0 judges every iteration (iterative DPO)
            if E.update_rm:
                # --em.st_pairs: this round's E-step pairs so far (all), or only the run's first
                # iteration's, the ones r0 labelled (first, Sec. 5.3)
                st = list(st_pairs) if E.st_pairs == "all" else [first_pairs]
                r_t = m_step(m, cfg, tag, it, D_r, pi_t=pi_t, pi_prev=gen_pi, r_prev=gen_r,
                             r0=r0, st_pairs=st)
                metrics["pseudo_pairs"] = read_json(it / "pseudo_pairs.info.json")
                metrics["rm"] = {**train_rm.summary(it / "rm"), **read_json(it / "rm_eval.json")}
            metrics.update(gold_diag.diagnose(tag, it, pi_t=pi_t, pi_prev=gen_pi, r_prev=gen_r,
                                              r_t=r_t))
            end_iteration(m, config, gold_diag.on, tag, it, metrics, len(history))
            gen_pi, gen_r, init_pi = pi_t, r_t, pi_t
        if stop:
            break  # a τ stop ends the whole run

    # line 10: output π_T and r_T
    # paths inside the run are relative to it, so a moved or copied run still names its own models
    summary = {"policy": run_path(gen_pi, run_dir), "rm": run_path(gen_r, run_dir),
               "iterations": history}
    if d.is_main:
        write_json(run_dir / "summary.json", summary)
        print_report(history, cfg, run_dir)
    track.finish()
    return summary


def tie_args(E: C.EMConfig) -> dict:
    """select's tie credit, passed (and so recorded in the manifest) only when it is not Eq. 6's
    0: the default run records exactly the stage arguments it always did."""
    return {"tie_credit": E.tie_credit} if E.tie_credit else {}


def run_path(path: Path, run_dir: Path) -> str:
    """A model's path as summary.json holds it: relative to the run directory when inside it (the
    selected checkpoint), else absolute (a base model kept by a τ stop at iteration 1)."""
    try:
        return Path(path).relative_to(run_dir).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def e_step(m: Manifest, cfg: C.Config, tag: str, it: Path, D_t: Path, pi_prev: Path,
           r_prev: Path, init_pi: Path):
    """Alg. 1 line 4: M responses per prompt of D_t from π_{t-1}, scored by r_{t-1}, made into
    pairs (--em.pair_rule); DPO (Eq. 4) from init_pi, which is also the reference."""
    E = cfg.em
    m.stage(f"{tag}/sample", train_policy.sample, [it / "samples.jsonl"],
            policy_dir=pi_prev, prompts_path=D_t, out_path=it / "samples.jsonl",
            sampling=cfg.sampling, n=E.n_samples, seed=cfg.seed, stream=f"{tag}/e-step")
    m.stage(f"{tag}/score", train_policy.score, [it / "scores.jsonl"], rm_dir=r_prev,
            samples_path=it / "samples.jsonl", out_path=it / "scores.jsonl")
    # the side file is an output too: a missing or edited one makes its stage run again
    m.stage(f"{tag}/pairs", train_policy.pairs, [it / "pairs.jsonl", it / "pairs.stats.json"],
            samples_path=it / "samples.jsonl", scores_path=it / "scores.jsonl",
            out_path=it / "pairs.jsonl", rule=E.pair_rule, keep_truncated=E.keep_truncated)
    check_pairs(it / "pairs.jsonl", D_t)
    m.stage(f"{tag}/ref_logps", train_policy.ref_logps, [it / "ref_logps.jsonl"],
            policy_dir=init_pi, pairs_path=it / "pairs.jsonl",
            out_path=it / "ref_logps.jsonl", **train_policy.reference_args(cfg.dpo))
    m.stage(f"{tag}/dpo", train_policy.dpo, [it / "policy"], policy_dir=init_pi,
            pairs_path=it / "pairs.jsonl", ref_path=it / "ref_logps.jsonl",
            out_dir=it / "policy", cfg=cfg.dpo)


def m_step(m: Manifest, cfg: C.Config, tag: str, it: Path, D_r: Path, pi_t: Path, pi_prev: Path,
           r_prev: Path, r0: Path, st_pairs: list[Path]) -> Path:
    """Alg. 1 lines 6-8: pseudo-pairs (y_t ~ π_t) ≻ (y_{t-1} ~ π_{t-1}) on D_R, filtered by ε_t
    (Sec. 4.3), and the RM trained on them (Eq. 5; --em.rm_data mixes in the E-step pairs).
    Returns r_t; rm_eval measures it beside r_{t-1} on held-out pseudo-pairs."""
    E = cfg.em
    m.stage(f"{tag}/pseudo_pairs", pseudo_pairs,
            [it / "pseudo_pairs.jsonl", it / "pseudo_pairs.info.json"],
            out_path=it / "pseudo_pairs.jsonl", pi_t=pi_t, pi_prev=pi_prev,
            r_prev=r_prev, d_r=D_r, sampling=cfg.sampling, strategy=E.filter,
            eps_stat=E.eps_stat, eps_mult=E.eps_mult, keep_truncated=E.keep_truncated,
            seed=cfg.seed, stream=tag,
            **({"oracle": True} if cfg.sandbox.oracle_pseudo_labels else {}))
    m.stage(f"{tag}/rm_data", rm_data, [it / "rm_train.jsonl", it / "rm_heldout.jsonl"],
            pseudo_path=it / "pseudo_pairs.jsonl", st_pairs=st_pairs, d_r=D_r,
            train_path=it / "rm_train.jsonl", heldout_path=it / "rm_heldout.jsonl",
            mode=E.rm_data, heldout=E.rm_heldout)
    # appendix B: every RM iteration restarts from r0
    m.stage(f"{tag}/rm", train_rm.train, [it / "rm"], init_dir=r0 if E.rm_restart else r_prev,
            pair_files=[it / "rm_train.jsonl"], out_dir=it / "rm", cfg=cfg.rm_train)
    r_t = it / "rm" / "final"
    m.stage(f"{tag}/rm_eval", rm_eval, [it / "rm_eval.json"], out_path=it / "rm_eval.json",
            r_new=r_t, r_prev=r_prev, heldout_path=it / "rm_heldout.jsonl")
    return r_t


def end_iteration(m: Manifest, config: dict, measured: bool, tag: str, it: Path, metrics: dict,
                  step: int):
    """Once per iteration, a τ stop's included: check that it recorded the stages `run_em.py
    status` plans (mt/manifest.py iteration_stages), write its metrics.json, log its numbers."""
    ran = [n.removeprefix(f"{tag}/") for n in m.reached if n.startswith(f"{tag}/")]
    planned = iteration_stages(config, measured, stop=metrics["selection"]["stop"])
    if ran != planned:  # a stage added to run() but not to the plan: status would misreport
        raise RuntimeError(f"{tag} recorded the stages {ran}, but mt/manifest.py "
                           f"iteration_stages lists {planned}: change both together")
    if dist.get().is_main:
        write_json(it / "metrics.json", metrics)
    track.log_iteration(step, iteration_scalars(metrics))


def print_report(history: list[dict], cfg: C.Config, run_dir: Path):
    """The end-of-run table; on a sandbox world, the gold view of what the RM only estimates."""
    print(table(history, cfg))
    if sandbox.is_world_prompts(cfg.prompts):
        print("\nGold view (mt/gold.py; mt/sandbox.py's gold reward, on D_MS):")
        print(gold.gold_table(gold.gold_view(run_dir)))


def preflight(cfg: C.Config):
    """The inputs checked before anything is written: a typo'd path or an impossible size fails
    here, not after iteration 1, and never pins a bad config.json."""
    prompts = read_prompts(cfg.prompts)  # every row validated
    track.require(cfg.log)  # a --log.* flag whose package is missing
    try:
        em.partition([p["prompt_id"] for p in prompts], cfg.iters,
                     cfg.em.rm_fraction if cfg.em.update_rm else 0.0, cfg.em.d_ms_size, cfg.seed)
    except ValueError as e:
        raise C.ConfigError(f"{cfg.prompts}: {e}") from None
    for flag, path, head in (("--policy", cfg.policy, "lm"), ("--rm", cfg.rm, "score")):
        got = read_config(path).head
        if got != head:
            kind = {"lm": "a causal LM (*ForCausalLM)",
                    "score": "a reward model (*ForSequenceClassification)"}
            raise C.ConfigError(f"{flag} {path}: has a {got!r} head; {flag} must be {kind[head]}. "
                                "Fix: swap --policy and --rm, or give the right directory")
    if cfg.sandbox.oracle_pseudo_labels and not sandbox.is_world_prompts(cfg.prompts):
        raise C.ConfigError(
            f"--sandbox.oracle_pseudo_labels true labels the M-step's pseudo-pairs with a sandbox "
            f"world's gold reward (mt/sandbox.py gold_reward), but --prompts {cfg.prompts} is not "
            "a sandbox world's prompt file, so there is no gold reward to ask: on real prompts the "
            "control would label pairs by a number-sorting score that means nothing there. Fix: "
            "drop --sandbox.oracle_pseudo_labels, or run on a world (give none of "
            "--policy/--rm/--prompts, e.g. --preset sandbox-no-select-oracle)")
    chat.check_prompt_lengths(chat.load_tokenizer(cfg.policy), prompts,
                              cfg.sampling.max_prompt_tokens, cfg.prompts, cfg.policy)
    world = dist.get().world_size
    for name in ("dpo", "rm_train"):
        t = getattr(cfg, name)
        if t.batch_size % (t.micro_batch_size * world):
            raise C.ConfigError(f"--{name}.batch_size={t.batch_size} is not a multiple of "
                                f"--{name}.micro_batch_size={t.micro_batch_size} × {world} "
                                "processes. Fix: change either, or the process count")


# ---- the stages that are bookkeeping over files (the heavy ones live in train_policy / train_rm)


def write_splits(prompts_path: Path, out_dir: Path, iters: int, rm_fraction: float, d_ms_size: int,
                 seed: int) -> dict:
    """Alg. 1 line 2: splits/{D_MS,D_R,D_1..D_T}.jsonl, by prompt id, from the seed."""
    prompts = {p["prompt_id"]: p for p in read_prompts(prompts_path)}
    parts = em.partition(list(prompts), iters, rm_fraction, d_ms_size, seed)
    if dist.get().is_main:
        for k, ids in parts.items():
            write_jsonl(out_dir / f"{k}.jsonl", [prompts[i] for i in ids])
    return {k: len(v) for k, v in parts.items()}


def check_pairs(pairs_path: Path, prompts_path: Path):
    stats = read_json(pairs_path.with_suffix(".stats.json"))
    if stats.get("pairs") == 0:
        why = ", ".join(f"{k}={v}" for k, v in stats.items()
                        if k.startswith(("dropped", "truncated", "empty")))
        raise RuntimeError(
            f"{pairs_path}: no preference pairs from {stats.get('prompts')} prompts of "
            f"{prompts_path} ({why}). Fix: raise --sampling.max_new_tokens (truncated responses "
            "give no pair), or --em.keep_truncated true, or check that the RM's scores are not "
            "all equal.")


def select(out_path: Path, candidates: Path, pi_prev: Path, r_prev: Path, d_ms: Path,
           sampling: C.SamplingConfig, tau: float, select: bool, seed: int, stream: str,
           tie_credit: float = 0.0) -> dict:
    """Eq. 6-7: every checkpoint in `candidates` against π_{t-1} on D_MS, judged by r_{t-1}
    (a tie counts tie_credit of a win: --em.tie_credit, 0 = Eq. 6).

    π_{t-1}'s responses on D_MS are sampled once and reused for every checkpoint k. Writes out_path
    (selection.json) and the responses and scores under selection/ beside it.
    """
    sel = out_path.parent / "selection"
    ckpts = train_policy.checkpoints(candidates)
    if not ckpts:
        raise FileNotFoundError(f"{candidates}: no checkpoints (ckpt-*/final) to select from")
    train_policy.sample(pi_prev, d_ms, sel / "prev.samples.jsonl", sampling, 1, seed,
                        f"{stream}/select-prev")
    # the same stream for every k: candidates are compared on common random numbers
    for k in ckpts:
        train_policy.sample(candidates / k, d_ms, sel / f"{k}.samples.jsonl", sampling, 1, seed,
                            f"{stream}/select")
    # one scoring call for π_{t-1} and every candidate:
    # an identical response gets one score, a tie in Eq. 6
    names = ["prev", *ckpts]
    scored = score_files(r_prev,
                         [(sel / f"{k}.samples.jsonl", sel / f"{k}.scores.jsonl") for k in names])
    first = {k: [r["scores"][0] for r in rows] for k, rows in zip(names, scored)}
    rates = {k: {**em.win_rate(first[k], first["prev"], tie_credit),
                 "truncated": truncated(sel / f"{k}.samples.jsonl")}
             for k in ckpts}
    choice = em.select_checkpoint({k: v["win_rate"] for k, v in rates.items()}, tau, select, ckpts)
    if dist.get().is_main:
        write_json(out_path, {**choice, "candidates": rates,
                              "prev_truncated": truncated(sel / "prev.samples.jsonl")})
    return choice


def truncated(samples_path: Path) -> float:
    """The share of responses that hit --sampling.max_new_tokens (what the cap costs)."""
    reasons = [f for r in read_samples(samples_path) for f in r["finish_reasons"]]
    return sum(f == "length" for f in reasons) / len(reasons)


def pseudo_pairs(out_path: Path, pi_t: Path, pi_prev: Path, r_prev: Path, d_r: Path,
                 sampling: C.SamplingConfig, strategy: str, eps_stat: str, eps_mult: float,
                 keep_truncated: bool, seed: int, stream: str, oracle: bool = False) -> dict:
    """(y_t ~ π_t) ≻ (y_{t-1} ~ π_{t-1}) on D_R, scored by r_{t-1}, filtered with ε_t (Sec. 4.3).

    Writes out_path (every pair with Δr, ε_t and its decision)
    and pseudo_pairs.info.json beside it. oracle (--sandbox.oracle_pseudo_labels): the same pairs
    labelled by the sandbox's gold reward instead (mt/gold.py oracle_pseudo_pairs).
    """
    pp = out_path.parent / "pseudo"
    train_policy.sample(pi_t, d_r, pp / "new.samples.jsonl", sampling, 1, seed,
                        f"{stream}/pseudo-new")
    train_policy.sample(pi_prev, d_r, pp / "prev.samples.jsonl", sampling, 1, seed,
                        f"{stream}/pseudo-prev")
    # one scoring call for both: an identical (y_t, y_{t-1}) gets Δr = 0 exactly (Eq. 8)
    score_files(r_prev, [(pp / "new.samples.jsonl", pp / "new.scores.jsonl"),
                         (pp / "prev.samples.jsonl", pp / "prev.scores.jsonl")])
    rows = em.make_pseudo_pairs(read_samples(pp / "new.samples.jsonl"),
                                read_samples(pp / "prev.samples.jsonl"),
                                read_scores(pp / "new.scores.jsonl"),
                                read_scores(pp / "prev.scores.jsonl"), keep_truncated)
    cap = {"truncated_new": truncated(pp / "new.samples.jsonl"),
           "truncated_prev": truncated(pp / "prev.samples.jsonl")}
    return filter_file(rows, out_path, strategy, eps_stat, eps_mult, cap, oracle)


def filter_file(rows: list[dict], out_path: Path, strategy: str, eps_stat: str, eps_mult: float,
                extra: dict | None = None, oracle: bool = False) -> dict:
    rows, info = em.filter_pseudo_pairs(rows, strategy, eps_stat, eps_mult)
    if oracle:  # the positive control: gold's labels replace r_{t-1}'s and its ε_t filter
        rows, info = gold.oracle_pseudo_pairs(rows, info)
    info.update(extra or {})
    if dist.get().is_main:
        write_json(out_path.with_suffix(".info.json"), info)
        write_jsonl(out_path, rows)
    return info


PAIR_FIELDS = ("prompt_id", "prompt", "chosen", "rejected")


def rm_data(pseudo_path: Path, st_pairs: list[Path], d_r: Path, train_path: Path,
            heldout_path: Path, mode: str, heldout: float) -> dict:
    """The M-step's training set (pc | st | mixed) and the held-out pseudo-pairs it never sees.

    The held-out prompts are the first `heldout` share of D_R's ids in sorted order."""
    ids = sorted(p["prompt_id"] for p in read_prompts(d_r))
    held_ids = set(ids[:max(1, round(len(ids) * heldout))]) if heldout > 0 and ids else set()
    rows = read_pseudo_pairs(pseudo_path)
    train_pc = [r for r in rows if r["prompt_id"] not in held_ids]
    held = [r for r in rows if r["prompt_id"] in held_ids and r["kept"]]
    st = [p for f in st_pairs for p in read_pairs(f)]
    train = [{k: r[k] for k in PAIR_FIELDS} for r in em.mix_rm_data(train_pc, st, mode)]
    if dist.get().is_main:
        write_jsonl(train_path, train)
        write_jsonl(heldout_path, [{k: r[k] for k in PAIR_FIELDS} for r in held])
    return {"train_pairs": len(train), "heldout_pairs": len(held)}


def rm_eval(out_path: Path, r_new: Path, r_prev: Path, heldout_path: Path) -> dict:
    """Accuracy of r_t and r_{t-1} on the held-out pseudo-pairs (their filtered labels)."""
    out = {"heldout_pairs": 0}
    if heldout_path.stat().st_size:  # an empty file: no held-out pair this iteration
        out = {"heldout_pairs": len(read_pairs(heldout_path)),
               "heldout_acc_new": train_rm.pair_accuracy(r_new, heldout_path),
               "heldout_acc_prev": train_rm.pair_accuracy(r_prev, heldout_path)}
    if dist.get().is_main:
        write_json(out_path, out)
    return out


def table(history: list[dict], cfg: C.Config) -> str:
    """The end-of-run table: one row per iteration."""
    head = ("| iter | pairs (dropped) | truncated | DPO loss / acc | win rates (chosen) | ε_t | "
            "pseudo kept/total | RM train acc | RM acc on held-out pseudo-labels (prev → new) |")
    lines = [head, "|" + "---|" * 9]

    def f(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)
    for h in history:
        p = h["pairs"]
        dropped = sum(v for k, v in p.items() if k.startswith("dropped_"))
        sel = h["selection"]
        rates = ", ".join(f"{k}:{v['win_rate']:.2f}" for k, v in sel.get("candidates", {}).items())
        chosen = sel.get("chosen") or f"stop(<{cfg.em.tau})"
        dpo, pp, rm = h.get("dpo", {}), h.get("pseudo_pairs", {}), h.get("rm", {})
        lines.append(
            f"| {h['round']}.{h['iter']} | {p.get('pairs', '-')} ({dropped}) | "
            f"{100 * p.get('truncated_responses', 0) / max(1, p.get('responses', 1)):.1f}% | "
            f"{f(dpo.get('loss'))} / {f(dpo.get('reward_acc'), '.2f')} | {rates} ({chosen}) | "
            f"{f(pp.get('eps_t'), '.4f')} | {pp.get('kept_total', '-')}/{pp.get('n', '-')} | "
            f"{f(rm.get('train_acc'), '.2f')} | {f(rm.get('heldout_acc_prev'), '.2f')} → "
            f"{f(rm.get('heldout_acc_new'), '.2f')} |")
    return "\n".join(lines)


def checkpoint_step(name: str, steps: int | None) -> int | None:
    """ckpt-6 -> 6; final -> the stage's step count."""
    return int(name.split("-")[1]) if name.startswith("ckpt-") else steps


def iteration_scalars(h: dict) -> dict[str, float]:
    """One iteration's numbers for the trackers (mt/track.py): the table's columns, each win rate,
    ε_t and the pseudo-pairs kept and dropped."""
    p, sel = h["pairs"], h["selection"]
    dpo, pp, rm = h.get("dpo", {}), h.get("pseudo_pairs", {}), h.get("rm", {})
    out = {"pairs": p.get("pairs"),
           "pairs_dropped": sum(v for k, v in p.items() if k.startswith("dropped_")),
           "truncated": p.get("truncated_responses", 0) / max(1, p.get("responses", 1)),
           "dpo_loss": dpo.get("loss"), "dpo_reward_acc": dpo.get("reward_acc"),
           "win_rate_best": sel.get("win_rate"), "stop": sel["stop"], "tau": sel.get("tau"),
           **{f"win_rate_{k}": v["win_rate"] for k, v in sel.get("candidates", {}).items()}}
    if sel.get("chosen"):
        out["chosen_step"] = checkpoint_step(sel["chosen"], dpo.get("steps"))
    if pp:
        out.update(eps_t=pp["eps_t"], pseudo_total=pp["n"], pseudo_kept=pp["kept_total"],
                   pseudo_dropped=pp["n"] - pp["kept_total"])
    if rm:
        out.update(rm_loss=rm.get("loss"), rm_train_acc=rm.get("train_acc"),
                   rm_heldout_acc_prev=rm.get("heldout_acc_prev"),
                   rm_heldout_acc_new=rm.get("heldout_acc_new"))
    return {k: v for k, v in out.items() if v is not None}


# ---- each stage alone, on explicit files: `python run_em.py STAGE --file path ...
# [--section.key value ...]`

STAGES = {  # stage -> (its file arguments, what it does)
    "sample": (("model", "prompts", "out"),
               "M responses per prompt (--em.n_samples) -> samples.jsonl"),
    "score": (("rm", "samples", "out"),
              "score every response of samples.jsonl with an RM -> scores.jsonl"),
    "pairs": (("samples", "scores", "out"),
              "preference pairs by --em.pair_rule -> pairs.jsonl (+ .stats.json)"),
    "dpo": (("policy", "pairs", "out"),
            "reference log-probs and DPO (Eq. 4) -> OUT/ref_logps.jsonl, "
            "OUT/policy/ckpt-*, final"),
    "select": (("prev", "candidates", "rm", "prompts", "out"),
               "win rate of every checkpoint vs the previous "
               "policy on D_MS (Eq. 6-7) -> OUT/selection.json"),
    "pseudo_pairs": (("new", "prev", "rm", "prompts", "out"),
                     "(y_t, y_{t-1}) on D_R, scored and filtered -> "
                     "OUT/pseudo_pairs.jsonl"),
    "filter": (("pseudo_pairs", "out"),
               "re-filter pseudo_pairs.jsonl with --em.filter / --em.eps_stat / "
               "--em.eps_mult -> OUT"),
    "rm": (("init", "pairs", "out"), "Bradley-Terry M-step (Eq. 5) from an RM or causal-LM dir on "
           "comma-separated pairs files -> OUT/final"),
}


FILE_STAGES = {"sample": "samples.jsonl", "score": "scores.jsonl", "pairs": "pairs.jsonl",
               "filter": "pseudo_pairs.jsonl"}  # the stages whose --out is a file


def stage_main(name: str, argv: list[str]):
    """One stage, reading and writing the files run_em.py uses (DESIGN.md §2)."""
    files, what = STAGES[name]
    doc = f"{what}\nneeds: {' '.join(f'--{k} PATH' for k in files)}"
    cfg = C.parse(argv, C.StageConfig(), f"python run_em.py {name}", doc)
    missing = [k for k in files if not getattr(cfg, k)]
    if missing:
        raise C.ConfigError(f"python run_em.py {name}: missing --{', --'.join(missing)} ({what})")
    dist.init_from(cfg)
    models = ("model", "rm", "policy", "prev", "new", "init")  # the flags naming a model
    hub.resolve_flags(cfg, *(k for k in files if k in models))  # a Hub id -> its cached snapshot
    a = {k: Path(getattr(cfg, k)) for k in files}
    if name in FILE_STAGES and a["out"].is_dir():
        raise C.ConfigError(f"--out {a['out']}: is a directory; `{name}` writes one file. Fix: "
                            f"give a file path, e.g. {a['out'] / FILE_STAGES[name]}")
    # the directory written into is held for the whole stage, as run_em.py holds its run (a file
    # stage's: its file's, so a second writer is refused at once, naming this one)
    hold_run_dir(a["out"].parent if name in FILE_STAGES else a["out"])
    # --log.*: a file output's directory stands for the run
    track.start(cfg.log, a["out"].parent if a["out"].suffix else a["out"], C.to_dict(cfg))
    stream, E = cfg.stream or name, cfg.em
    if name == "sample":
        return train_policy.sample(a["model"], a["prompts"], a["out"], cfg.sampling, E.n_samples,
                                   cfg.seed, stream)
    if name == "score":
        return train_policy.score(a["rm"], a["samples"], a["out"])
    if name == "pairs":
        return train_policy.pairs(a["samples"], a["scores"], a["out"], E.pair_rule,
                                  E.keep_truncated)
    if name == "dpo":
        train_policy.ref_logps(a["policy"], a["pairs"], a["out"] / "ref_logps.jsonl",
                               **train_policy.reference_args(cfg.dpo))
        return train_policy.dpo(a["policy"], a["pairs"], a["out"] / "ref_logps.jsonl",
                                a["out"] / "policy", cfg.dpo)
    if name == "select":
        return select(a["out"] / "selection.json", a["candidates"], a["prev"], a["rm"],
                      a["prompts"], cfg.sampling, E.tau, E.select, cfg.seed, stream, E.tie_credit)
    if name == "pseudo_pairs":
        return pseudo_pairs(a["out"] / "pseudo_pairs.jsonl", a["new"], a["prev"], a["rm"],
                            a["prompts"], cfg.sampling, E.filter, E.eps_stat, E.eps_mult,
                            E.keep_truncated, cfg.seed, stream)
    # re-filter existing pseudo-pairs with another strategy or ε_t, without resampling
    if name == "filter":
        return filter_file(read_pseudo_pairs(a["pseudo_pairs"]), a["out"], E.filter, E.eps_stat,
                           E.eps_mult)
    if name == "rm":
        return train_rm.train(a["init"], [Path(p) for p in cfg.pairs.split(",") if p], a["out"],
                              cfg.rm_train)


def resolve_inputs(cfg: C.Config) -> C.Config:
    """No --policy/--rm/--prompts: the embedded default, the gold-reward sandbox
    (built once, cached)."""
    if cfg.policy or cfg.rm or cfg.prompts or not cfg.preset.startswith("sandbox"):
        missing = [k for k in ("policy", "rm", "prompts") if not getattr(cfg, k)]
        if missing:
            raise C.ConfigError(f"missing --{', --'.join(missing)} (or give none of "
                                "--policy/--rm/--prompts to run the gold-reward sandbox)")
        return hub.resolve_flags(cfg, "policy", "rm")  # a Hub id -> its cached snapshot
    world = sandbox.build_world(seed=cfg.seed, world=cfg.sandbox.world)
    cfg.policy, cfg.rm, cfg.prompts = (str(world.policy_dir), str(world.rm_dir),
                                       str(world.prompts_path))
    return cfg


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return status_main(argv[1:])
    if argv and argv[0] == "plan":  # memory, time and disk before launch (mt/plan.py); exit 3: won't fit
        cfg = mt_plan.parse(argv[1:])
        preflight(resolve_inputs(cfg))
        print("preflight: ok (prompt rows and splits, --policy/--rm heads, every prompt within "
              "--sampling.max_prompt_tokens, batch sizes)", flush=True)
        if mt_plan.plan(cfg):
            raise SystemExit(mt_plan.NOT_FIT)
        return {}
    if argv and argv[0] in STAGES:
        try:
            return stage_main(argv[0], argv[1:])
        finally:
            track.finish()
    keys = {a.split("=")[0] for a in argv if a.startswith("--")}
    if not keys & {"--preset", "--policy", "--rm", "--prompts"}:
        argv = ["--preset", "sandbox", *argv]  # the embedded default main job
    doc = (__doc__ + "\nstages: " + ", ".join(STAGES) + " (python run_em.py STAGE --help); "
           "python run_em.py status --out RUN: where a run stands")
    return run(resolve_inputs(C.parse(argv, C.Config(), "python run_em.py", doc)))


if __name__ == "__main__":
    dist.run(main)
