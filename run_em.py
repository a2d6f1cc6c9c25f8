"""Mutual-Taught (Algorithm 1): co-adapt a policy and its reward model, EM-style.

    python run_em.py                                        # the gold-reward sandbox, CPU, minutes
    python run_em.py --preset paper --policy DIR --rm DIR --prompts FILE --out runs/mt
    torchrun --nproc_per_node 8 run_em.py --policy DIR --rm DIR --prompts FILE --iters 2

Every stage reads and writes files (DESIGN.md §2) and is recorded in <out>/manifest.json with the
hashes of its inputs and outputs. Rerunning the same command skips finished stages and redoes an
unfinished one; a different config is refused (naming the keys) unless --force_config is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import train_policy
import train_rm
from mt import config as C
from mt import dist, em
from mt.data import read_jsonl_rows, read_prompts, write_json, write_jsonl

# ---- the run directory: config check and manifest


def check_config(run_dir: Path, cfg: C.Config, force: bool):
    """A rerun must use the run's config: otherwise finished stages would mix two experiments."""
    path = run_dir / "config.json"
    new = C.to_dict(cfg)
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [c for c in C.diff(old, new) if c.split(":")[0] not in C.SCHEDULING_ONLY]
        if changed and not force:
            raise C.ConfigError(
                f"{path}: this run was started with a different config:\n  " + "\n  ".join(changed)
                + "\nUse the original flags, a new --out, or --force_config true to continue with the new "
                "config (finished stages whose inputs are unchanged are kept).")
    if dist.get().is_main:
        write_json(path, new)


def fingerprint(path: Path) -> str:
    """sha256 of a file or of a directory's files (names + contents). Files over 256 MiB are hashed
    by size and their first and last 8 MiB, so checking an 8B checkpoint stays fast."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if size <= 256 * 2**20:
                h.update(fh.read())
            else:
                h.update(str(size).encode() + fh.read(8 * 2**20))
                fh.seek(size - 8 * 2**20)
                h.update(fh.read())
    return h.hexdigest()


class Manifest:
    """Stage status with input/output hashes, written atomically by rank 0 after every stage."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir.resolve()
        self.path = run_dir / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def _key(self, p: Path) -> str:
        """Paths inside the run are recorded relative to it, so a moved run directory stays valid."""
        p = p.resolve()
        return p.relative_to(self.run_dir).as_posix() if p.is_relative_to(self.run_dir) else str(p)

    def _hashes(self, paths) -> dict | None:
        paths = [Path(p) for p in paths]
        if not all(p.exists() for p in paths):
            return None
        return {self._key(p): fingerprint(p) for p in paths}

    def forget(self, name: str, outputs):
        """A finished stage whose inputs or params changed: drop its record, then its stale outputs.

        In that order, so a crash in between leaves an unrecorded stage, which is redone; a stage that
        was never recorded keeps its partial outputs (a DPO stage resumes from its last checkpoint).
        """
        del self.data["stages"][name]
        write_json(self.path, self.data)
        for p in map(Path, outputs):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def done(self, name: str, inputs, outputs, params) -> bool:
        st = self.data["stages"].get(name)
        return (bool(st) and st["params"] == params and st["inputs"] == self._hashes(inputs)
                and st["outputs"] == self._hashes(outputs))

    def record(self, name: str, inputs, outputs, params, seconds: float, info: dict | None = None):
        self.data["stages"][name] = {"status": "done", "params": params, "inputs": self._hashes(inputs),
                                     "outputs": self._hashes(outputs), "seconds": round(seconds, 2),
                                     "info": info or {}}
        write_json(self.path, self.data)


def stage(m: Manifest, name: str, inputs: list, outputs: list, fn, params=None):
    """Run fn() on every rank unless the manifest says this stage is done with these inputs.

    `params` are the config values the stage depends on: changing one (under --force_config) redoes
    the stage, and, through the changed output hashes, every stage downstream of it.
    """
    params = json.loads(json.dumps(params, default=C.to_dict))
    done = dist.broadcast_object(m.done(name, inputs, outputs, params) if dist.get().is_main else None)
    if done:
        dist.print0(f"[done] {name}")
        return
    stale = name in m.data["stages"]
    dist.print0(f"[run]  {name}" + ("  (inputs or config changed since it last ran)" if stale else ""))
    if stale and dist.get().is_main:
        m.forget(name, outputs)
    dist.barrier()
    t0 = time.time()
    info = fn()
    dist.barrier()
    if dist.get().is_main:
        m.record(name, inputs, outputs, params, time.time() - t0, info if isinstance(info, dict) else None)
    dist.barrier()
    if os.environ.get("MT_KILL_AFTER_STAGE") == name:  # fault injection for the crash-resume tests
        os.kill(os.getpid(), signal.SIGKILL)


# ---- Algorithm 1


def resolve_inputs(cfg: C.Config) -> C.Config:
    """No --policy/--rm/--prompts: the embedded default, the gold-reward sandbox (built once, cached)."""
    if cfg.policy or cfg.rm or cfg.prompts or cfg.preset != "sandbox":
        missing = [k for k in ("policy", "rm", "prompts") if not getattr(cfg, k)]
        if missing:
            raise C.ConfigError(f"missing --{', --'.join(missing)} (or give none of --policy/--rm/--prompts "
                                "to run the gold-reward sandbox)")
        return cfg
    from mt import sandbox
    world = sandbox.build_world(seed=cfg.seed)
    cfg.policy, cfg.rm, cfg.prompts = str(world.policy_dir), str(world.rm_dir), str(world.prompts_path)
    return cfg


def run(cfg: C.Config, force_config: bool = False) -> dict:
    d = dist.init_distributed(None if cfg.device == "auto" else cfg.device)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config(run_dir, cfg, force_config)
    m = Manifest(run_dir)
    E = cfg.em

    # Alg. 1 line 2: partition D into D_1..D_T, D_R and the fixed D_MS (by prompt id, from the seed)
    prompts = {p.id: p for p in read_prompts(cfg.prompts)}
    parts = em.partition(list(prompts), cfg.iters, E.rm_fraction if E.update_rm else 0.0, E.d_ms_size,
                         cfg.seed)
    split = {k: run_dir / "splits" / f"{k}.jsonl" for k in parts}

    def write_splits():
        if d.is_main:
            for k, ids in parts.items():
                write_jsonl(split[k], [prompts[i].to_row() for i in ids])
        return {k: len(v) for k, v in parts.items()}
    stage(m, "splits", [cfg.prompts], list(split.values()), write_splits,
          [cfg.seed, cfg.iters, E.rm_fraction, E.update_rm, E.d_ms_size])
    n_held = max(1, round(len(parts["D_R"]) * E.rm_heldout)) if E.rm_heldout > 0 and parts["D_R"] else 0
    d_r_heldout = set(sorted(parts["D_R"])[:n_held])

    pi0, r0 = Path(cfg.policy), Path(cfg.rm)
    history = []
    gen_pi, gen_r = pi0, r0  # the models that generate and judge the data of the next iteration
    for rnd in range(1, E.rounds + 1):
        # Sec. 5.3: a new round starts both models from the base models; the previous round's models
        # only generate and judge its first iteration's data
        init_pi = pi0
        st_pairs: list[Path] = []
        for t in range(1, cfg.iters + 1):
            it = run_dir / (f"iter{t}" if E.rounds == 1 else f"round{rnd}/iter{t}")
            tag = it.relative_to(run_dir).as_posix()
            seed = cfg.seed
            D_t, D_ms, D_r = split[f"D_{t}"], split["D_MS"], split["D_R"]

            # ---- E-step: sample M responses from π_{t-1}, score with r_{t-1}, build pairs, DPO (Eq. 4)
            stage(m, f"{tag}/sample", [gen_pi, D_t], [it / "samples.jsonl"],
                  lambda: train_policy.sample(gen_pi, D_t, it / "samples.jsonl", cfg.sampling, E.n_samples,
                                              seed, f"{tag}/e-step"), [cfg.sampling.outcome(), E.n_samples, seed])
            stage(m, f"{tag}/score", [gen_r, it / "samples.jsonl"], [it / "scores.jsonl"],
                  lambda: train_policy.score(gen_r, it / "samples.jsonl", it / "scores.jsonl"))
            stage(m, f"{tag}/pairs", [it / "samples.jsonl", it / "scores.jsonl"], [it / "pairs.jsonl"],
                  lambda: train_policy.pairs(it / "samples.jsonl", it / "scores.jsonl", it / "pairs.jsonl",
                                             E.pair_rule, E.keep_truncated), [E.pair_rule, E.keep_truncated])
            stats = read_stats(it / "pairs.jsonl")
            if stats.get("pairs") == 0:
                raise RuntimeError(
                    f"{it / 'pairs.jsonl'}: no preference pairs from {stats.get('prompts')} prompts of {D_t} "
                    f"({', '.join(f'{k}={v}' for k, v in stats.items() if k.startswith(('dropped', 'truncated', 'empty')))}). "
                    "Fix: raise --sampling.max_new_tokens (truncated responses give no pair), or --em.keep_truncated "
                    "true, or check that the RM's scores are not all equal.")
            st_pairs.append(it / "pairs.jsonl")
            stage(m, f"{tag}/ref_logps", [init_pi, it / "pairs.jsonl"], [it / "ref_logps.jsonl"],
                  lambda: train_policy.ref_logps(init_pi, it / "pairs.jsonl", it / "ref_logps.jsonl", cfg.dpo),
                  [cfg.dpo.max_length, cfg.dpo.micro_batch_size, cfg.dpo.loss, cfg.dpo.dtype])
            stage(m, f"{tag}/dpo", [init_pi, it / "pairs.jsonl", it / "ref_logps.jsonl"], [it / "policy"],
                  lambda: train_policy.dpo(init_pi, it / "pairs.jsonl", it / "ref_logps.jsonl", it / "policy",
                                           cfg.dpo), [cfg.dpo])

            # ---- model selection (Eq. 6-7): every checkpoint vs π_{t-1} on D_MS, judged by r_{t-1}
            stage(m, f"{tag}/select", [gen_pi, gen_r, it / "policy", D_ms], [it / "selection.json"],
                  lambda: select(it, it / "policy", gen_pi, gen_r, D_ms, cfg, seed, tag), [cfg.sampling.outcome(), E.tau, E.select, seed])
            selection = json.loads((it / "selection.json").read_text())
            metrics = {"round": rnd, "iter": t, "pairs": read_stats(it / "pairs.jsonl"), "dpo": dpo_summary(it),
                       "selection": selection}
            if selection["stop"]:
                dist.print0(f"{tag}: best win rate {selection['win_rate']:.3f} < τ={E.tau}: stop, keep π_{t - 1}, "
                            f"r_{t - 1}")
                history.append(metrics)
                break
            pi_t = it / "policy" / selection["chosen"]

            # ---- pseudo-pairs (Alg. 1 line 6), filtering (line 7), M-step (line 8, Eq. 5)
            r_t = gen_r
            if E.update_rm:
                stage(m, f"{tag}/pseudo_pairs", [pi_t, gen_pi, gen_r, D_r], [it / "pseudo_pairs.jsonl"],
                      lambda: pseudo_pairs(it, pi_t, gen_pi, gen_r, D_r, cfg, seed, tag),
                      [cfg.sampling.outcome(), E.filter, E.eps_stat, E.eps_mult, E.keep_truncated, seed])
                stage(m, f"{tag}/rm_data", [it / "pseudo_pairs.jsonl", *st_pairs],
                      [it / "rm_train.jsonl", it / "rm_heldout.jsonl"],
                      lambda: rm_data(it, st_pairs, d_r_heldout, E.rm_data), [E.rm_data, E.rm_heldout])
                rm_init = r0 if E.rm_restart else gen_r  # appendix B: every RM iteration restarts from r0
                stage(m, f"{tag}/rm", [rm_init, it / "rm_train.jsonl"], [it / "rm"],
                      lambda: train_rm.train(rm_init, [it / "rm_train.jsonl"], it / "rm", cfg.rm_train),
                      [cfg.rm_train])
                stage(m, f"{tag}/rm_eval", [it / "rm", gen_r, it / "rm_heldout.jsonl"], [it / "rm_eval.json"],
                      lambda: rm_eval(it, gen_r))
                r_t = it / "rm"
                metrics["pseudo_pairs"] = json.loads((it / "pseudo_pairs.info.json").read_text())
                metrics["rm"] = {**rm_summary(it), **json.loads((it / "rm_eval.json").read_text())}
            if d.is_main:
                write_json(it / "metrics.json", metrics)
            history.append(metrics)
            gen_pi, gen_r, init_pi = pi_t, r_t, pi_t
        else:
            continue
        break  # a τ stop ends the whole run

    summary = {"policy": str(gen_pi), "rm": str(gen_r), "iterations": history}
    if d.is_main:
        write_json(run_dir / "summary.json", summary)
        print(table(history, cfg))
        if cfg.preset == "sandbox":  # the world's gold reward shows what the RM can only estimate
            from eval.sandbox_report import gold_table, gold_view
            print("\nGold view (mt/sandbox.py's gold reward; policy numbers on D_MS):")
            print(gold_table(gold_view(run_dir)))
    return summary


# ---- the stages that are pure bookkeeping over files (the heavy ones live in train_policy / train_rm)


def select(out: Path, candidates: Path, pi_prev: Path, r_prev: Path, d_ms: Path, cfg: C.Config, seed: int,
           tag: str) -> dict:
    """Eq. 6-7: every checkpoint in `candidates` against π_{t-1} on D_MS, judged by r_{t-1}.

    π_{t-1}'s responses on D_MS are sampled once and reused for every checkpoint k. Writes
    out/selection.json and the responses and scores under out/selection/.
    """
    sel = out / "selection"
    one = dict(n=1, seed=seed)
    train_policy.sample(pi_prev, d_ms, sel / "prev.samples.jsonl", cfg.sampling, stream=f"{tag}/select-prev", **one)
    train_policy.score(r_prev, sel / "prev.samples.jsonl", sel / "prev.scores.jsonl")
    old = [r["scores"][0] for r in read_jsonl_rows(sel / "prev.scores.jsonl")]
    ckpts = train_policy.checkpoints(candidates)
    if not ckpts:
        raise FileNotFoundError(f"{candidates}: no checkpoints (ckpt-*/final) to select from")
    rates = {}
    for k in ckpts:
        s = sel / f"{k}.samples.jsonl"
        # the same stream for every k: candidates are compared on common random numbers
        train_policy.sample(candidates / k, d_ms, s, cfg.sampling, stream=f"{tag}/select", **one)
        train_policy.score(r_prev, s, sel / f"{k}.scores.jsonl")
        new = [r["scores"][0] for r in read_jsonl_rows(sel / f"{k}.scores.jsonl")]
        rates[k] = em.win_rate(new, old)
    choice = em.select_checkpoint({k: v["win_rate"] for k, v in rates.items()}, cfg.em.tau, cfg.em.select, ckpts)
    if dist.get().is_main:
        write_json(out / "selection.json", {**choice, "candidates": rates})
    return choice


def pseudo_pairs(out: Path, pi_t: Path, pi_prev: Path, r_prev: Path, d_r: Path, cfg: C.Config, seed: int,
                 tag: str) -> dict:
    """(y_t ~ π_t) ≻ (y_{t-1} ~ π_{t-1}) on D_R, scored by r_{t-1}, filtered with ε_t (Sec. 4.3).

    Writes out/pseudo_pairs.jsonl (every pair with Δr, ε_t and its decision) and pseudo_pairs.info.json.
    """
    pp = out / "pseudo"
    one = dict(n=1, seed=seed)
    train_policy.sample(pi_t, d_r, pp / "new.samples.jsonl", cfg.sampling, stream=f"{tag}/pseudo-new", **one)
    train_policy.sample(pi_prev, d_r, pp / "prev.samples.jsonl", cfg.sampling, stream=f"{tag}/pseudo-prev", **one)
    train_policy.score(r_prev, pp / "new.samples.jsonl", pp / "new.scores.jsonl")
    train_policy.score(r_prev, pp / "prev.samples.jsonl", pp / "prev.scores.jsonl")
    rows = em.make_pseudo_pairs(
        read_jsonl_rows(pp / "new.samples.jsonl"), read_jsonl_rows(pp / "prev.samples.jsonl"),
        read_jsonl_rows(pp / "new.scores.jsonl"), read_jsonl_rows(pp / "prev.scores.jsonl"), cfg.em.keep_truncated)
    return filter_file(rows, out / "pseudo_pairs.jsonl", cfg)


def filter_file(rows: list[dict], out_path: Path, cfg: C.Config) -> dict:
    rows, info = em.filter_pseudo_pairs(rows, cfg.em.filter, cfg.em.eps_stat, cfg.em.eps_mult)
    if dist.get().is_main:
        write_json(out_path.with_suffix(".info.json"), info)
        write_jsonl(out_path, rows)
    return info


def rm_data(it: Path, st_pairs: list[Path], heldout: set, mode: str):
    """The M-step's training set (pc | st | mixed) and the held-out pseudo-pairs it never sees."""
    rows = read_jsonl_rows(it / "pseudo_pairs.jsonl")
    train_pc = [r for r in rows if r["prompt_id"] not in heldout]
    held = [r for r in rows if r["prompt_id"] in heldout and r["kept"]]
    st = [p for f in st_pairs for p in read_jsonl_rows(f)]
    train = [{k: v for k, v in r.items() if k in ("prompt_id", "prompt", "chosen", "rejected")}
             for r in em.mix_rm_data(train_pc, st, mode)]
    if dist.get().is_main:
        write_jsonl(it / "rm_train.jsonl", train)
        write_jsonl(it / "rm_heldout.jsonl", [{k: r[k] for k in ("prompt_id", "prompt", "chosen", "rejected")}
                                              for r in held])
    return {"train_pairs": len(train), "heldout_pairs": len(held)}


def rm_eval(it: Path, r_prev: Path):
    """Accuracy of r_t and r_{t-1} on the held-out pseudo-pairs (their filtered labels)."""
    held = it / "rm_heldout.jsonl"
    out = {"heldout_pairs": 0}
    if read_jsonl_rows(held):
        out = {"heldout_pairs": len(read_jsonl_rows(held)),
               "heldout_acc_new": train_rm.pair_accuracy(it / "rm", held),
               "heldout_acc_prev": train_rm.pair_accuracy(r_prev, held)}
    if dist.get().is_main:
        write_json(it / "rm_eval.json", out)
    return out


def read_stats(pairs_path: Path) -> dict:
    p = pairs_path.with_suffix(".stats.json")
    return json.loads(p.read_text()) if p.is_file() else {}


def dpo_summary(it: Path) -> dict:
    return train_policy.summary(it / "policy")


def rm_summary(it: Path) -> dict:
    return train_rm.summary(it / "rm")


def table(history: list[dict], cfg: C.Config) -> str:
    """The end-of-run table: one row per iteration."""
    head = ("| iter | pairs (dropped) | DPO loss / acc | win rates (chosen) | ε_t | pseudo kept/total "
            "| RM train acc | RM held-out acc (prev → new) |")
    lines = [head, "|" + "---|" * 8]
    for h in history:
        p = h["pairs"]
        dropped = sum(v for k, v in p.items() if k.startswith("dropped_"))
        sel = h["selection"]
        rates = ", ".join(f"{k}:{v['win_rate']:.2f}" for k, v in sel.get("candidates", {}).items())
        chosen = sel.get("chosen") or f"stop(<{cfg.em.tau})"
        dpo = h.get("dpo", {})
        pp, rm = h.get("pseudo_pairs", {}), h.get("rm", {})

        def f(x, fmt=".3f"):
            return "-" if x is None else format(x, fmt)
        lines.append(
            f"| {h['round']}.{h['iter']} | {p.get('pairs', '-')} ({dropped}) | {f(dpo.get('loss'))} / "
            f"{f(dpo.get('reward_acc'), '.2f')} | {rates} ({chosen}) | {f(pp.get('eps_t'), '.4f')} | "
            f"{pp.get('kept_total', '-')}/{pp.get('n', '-')} | {f(rm.get('train_acc'), '.2f')} | "
            f"{f(rm.get('heldout_acc_prev'), '.2f')} → {f(rm.get('heldout_acc_new'), '.2f')} |")
    return "\n".join(lines)


# ---- each stage alone, on explicit files: `python run_em.py STAGE --file args ... [--config.key value ...]`

STAGES = {  # stage -> its file arguments; every other flag is a config override (mt/config.py)
    "sample": ("--model", "--prompts", "--out"),
    "score": ("--rm", "--samples", "--out"),
    "pairs": ("--samples", "--scores", "--out"),
    "dpo": ("--policy", "--pairs", "--out"),
    "select": ("--prev", "--candidates", "--rm", "--prompts", "--out"),
    "pseudo_pairs": ("--new", "--prev", "--rm", "--prompts", "--out"),
    "filter": ("--pseudo_pairs", "--out"),
    "rm": ("--init", "--pairs", "--out"),
}


def stage_main(name: str, argv: list[str]):
    """One stage, reading and writing the files run_em.py uses (DESIGN.md §2)."""
    import argparse
    ap = argparse.ArgumentParser(prog=f"python run_em.py {name}", description=STAGE_HELP[name])
    for flag in STAGES[name]:
        ap.add_argument(flag, required=True, type=Path)
    ap.add_argument("--stream", default=name, help="name of the random stream (run_em uses e.g. iter1/e-step)")
    a, rest = ap.parse_known_args(argv)
    cfg = C.parse_args(rest)
    dist.init_distributed(None if cfg.device == "auto" else cfg.device)
    if name == "sample":
        return train_policy.sample(a.model, a.prompts, a.out, cfg.sampling, cfg.em.n_samples, cfg.seed, a.stream)
    if name == "score":
        return train_policy.score(a.rm, a.samples, a.out)
    if name == "pairs":
        return train_policy.pairs(a.samples, a.scores, a.out, cfg.em.pair_rule, cfg.em.keep_truncated)
    if name == "dpo":
        train_policy.ref_logps(a.policy, a.pairs, a.out / "ref_logps.jsonl", cfg.dpo)
        return train_policy.dpo(a.policy, a.pairs, a.out / "ref_logps.jsonl", a.out / "policy", cfg.dpo)
    if name == "select":
        return select(a.out, a.candidates, a.prev, a.rm, a.prompts, cfg, cfg.seed, a.stream)
    if name == "pseudo_pairs":
        return pseudo_pairs(a.out, a.new, a.prev, a.rm, a.prompts, cfg, cfg.seed, a.stream)
    if name == "filter":  # re-filter existing pseudo-pairs with another strategy or ε_t, without resampling
        return filter_file(read_jsonl_rows(a.pseudo_pairs), a.out, cfg)
    if name == "rm":
        return train_rm.train(a.init, [Path(p) for p in str(a.pairs).split(",")], a.out, cfg.rm_train)


STAGE_HELP = {
    "sample": "M responses per prompt (--em.n_samples) -> samples.jsonl",
    "score": "score every response of samples.jsonl with an RM -> scores.jsonl",
    "pairs": "preference pairs by --em.pair_rule -> pairs.jsonl (+ pairs.stats.json)",
    "dpo": "reference log-probs and DPO (Eq. 4) -> OUT/ref_logps.jsonl, OUT/policy/ckpt-*, final",
    "select": "win rate of every checkpoint vs the previous policy on D_MS (Eq. 6-7) -> OUT/selection.json",
    "pseudo_pairs": "(y_t, y_{t-1}) on D_R, scored and filtered -> OUT/pseudo_pairs.jsonl",
    "filter": "re-filter pseudo_pairs.jsonl with --em.filter / --em.eps_stat / --em.eps_mult -> OUT",
    "rm": "Bradley-Terry M-step (Eq. 5) from an RM or causal-LM dir on comma-separated pairs files -> OUT",
}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        return stage_main(argv[0], argv[1:])
    force = False
    if "--force_config" in argv:
        i = argv.index("--force_config")
        force = C._parse("force_config", argv[i + 1] if i + 1 < len(argv) else "true", bool)
        del argv[i:i + 2]
    keys = {a.split("=")[0] for a in argv if a.startswith("--")}
    if not keys & {"--preset", "--policy", "--rm", "--prompts"}:
        argv = ["--preset", "sandbox", *argv]  # the embedded default main job
    cfg = resolve_inputs(C.parse_args(argv))
    return run(cfg, force)


if __name__ == "__main__":
    dist.run(main)
