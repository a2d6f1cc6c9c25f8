"""The E-step, standalone: sample from π_{t-1}, score with r_{t-1}, build pairs, DPO against π_{t-1} (Eq. 4).

    python train_policy.py --policy DIR --rm DIR --prompts FILE --out runs/estep
    python train_policy.py --policy DIR --pairs pairs.jsonl --out runs/dpo --dpo.loss simpo   # offline baselines
    torchrun --nproc_per_node 8 train_policy.py --policy DIR --rm DIR --prompts FILE --out runs/estep

Flags are mt/config.py's (`--dpo.beta 0.05`, `--em.pair_rule max_min`, `--sampling.temperature 1.0`,
`--preset tiny`). Writes, under --out (DESIGN.md §2): samples.jsonl, scores.jsonl, pairs.jsonl (+ .stats.json),
ref_logps.jsonl, policy/ckpt-{step}/ and policy/final/ (Hugging Face directories), policy/metrics.jsonl.
A rerun skips the files that exist (each is written atomically) and resumes DPO from its last checkpoint.
Each step is also a function here, so run_em.py calls them one by one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from mt import config as C
from mt import dist

# ---- E-step / sample: M responses per prompt from π_{t-1} (T=0.8, top-p 0.95)


def sample(policy_dir, prompts_path, out_path, sampling: C.SamplingConfig, n: int = 5, seed: int = 0,
           stream: str = "policy") -> dict:
    """samples.jsonl for every prompt of prompts_path; data-parallel over ranks. Returns the summary."""
    from mt import chat
    from mt.checkpoint import load_model
    from mt.data import read_prompts
    from mt.sampler import sample_to_file, summary_line
    d = dist.get()
    tok = chat.load_tokenizer(policy_dir)
    model = load_model(policy_dir, "auto", d.device).eval()
    s = sample_to_file(model, tok, read_prompts(prompts_path), sampling, out_path, seed=seed, stream=stream, n=n,
                       stop_ids=chat.stop_ids(tok, policy_dir))
    dist.print0(summary_line(s) + f" -> {out_path}")
    return s


# ---- E-step / score: every response scored by r_{t-1}


def score(rm_dir, samples_path, out_path) -> dict:
    from mt.scoring import score_file
    rows = score_file(rm_dir, samples_path, out_path)
    return {"prompts": len(rows), "responses": sum(len(r["scores"]) for r in rows)}


# ---- E-step / pairs (appendix B "Length control", or max/min)


def pairs(samples_path, scores_path, out_path, rule: str = "length_control", keep_truncated: bool = False) -> dict:
    """pairs.jsonl plus pairs.stats.json (pairs kept, prompts dropped and why)."""
    from mt.data import read_samples, read_scores, write_json, write_jsonl
    from mt.em import make_pairs
    samples = [s.to_row() for s in read_samples(samples_path)]
    scores = [s.to_row() for s in read_scores(scores_path)]
    rows, stats = make_pairs(samples, scores, rule, keep_truncated)
    stats = dict(stats)
    if dist.get().is_main:
        write_jsonl(out_path, rows)
        write_json(Path(out_path).with_suffix(".stats.json"), stats)
    dist.barrier()
    dist.print0(f"pairs ({rule}): {stats.get('pairs', 0)} from {stats.get('prompts', 0)} prompts; dropped "
                + (", ".join(f"{k[8:]} {v}" for k, v in stats.items() if k.startswith("dropped_")) or "none"))
    return stats


# ---- E-step / reference log-probs: once, with the frozen π_{t-1}, before any update


def _policy_and_examples(policy_dir, pairs_path, cfg: C.DPOConfig):
    from mt import chat
    from mt.data import read_pairs
    from mt.train import load_for_training, policy_examples
    tok = chat.load_tokenizer(policy_dir)
    pair_rows = read_pairs(pairs_path)
    examples, dropped = policy_examples(tok, pair_rows, cfg.max_length)
    if dropped:
        dist.print0(f"{pairs_path}: dropped {dropped} of {len(pair_rows)} pairs longer than "
                    f"max_length={cfg.max_length} tokens (--dpo.max_length)")
    model = load_for_training(policy_dir, cfg)  # under FSDP only rank 0 reads the weights
    return model, examples, {"pairs": len(pair_rows), "dropped_too_long": dropped}, tok.pad_token_id or 0


def _compute_ref(model, examples, out_path, cfg, pad_id, policy_dir):
    from mt.losses import USES_REFERENCE
    from mt.train import reference_logps, write_ref_logps
    refs = reference_logps(model, examples, 2 * cfg.micro_batch_size, pad_id) if USES_REFERENCE[cfg.loss] else {}
    if dist.get().is_main:
        write_ref_logps(out_path, [e for e in examples if e.key in refs], refs, policy_dir)
    dist.barrier()
    return refs


def ref_logps(policy_dir, pairs_path, out_path, cfg: C.DPOConfig) -> dict:
    """ref_logps.jsonl: summed log-probs of chosen and rejected under π_{t-1}, keyed by pair id."""
    model, examples, info, pad_id = _policy_and_examples(policy_dir, pairs_path, cfg)
    _compute_ref(model, examples, out_path, cfg, pad_id, policy_dir)
    return info


# ---- E-step / DPO (Eq. 4): β=0.01, batch 128, lr 7e-7, cosine, warmup 0.1, checkpoint every 50 steps


def dpo(policy_dir, pairs_path, ref_path, out_dir, cfg: C.DPOConfig) -> dict:
    """Train π_t from π_{t-1} on pairs_path; reference log-probs from ref_path (computed there if missing)."""
    from mt.losses import USES_REFERENCE
    from mt.train import read_ref_logps, train
    model, examples, info, pad_id = _policy_and_examples(policy_dir, pairs_path, cfg)
    refs = None
    if USES_REFERENCE[cfg.loss]:
        refs = (read_ref_logps(ref_path, examples) if Path(ref_path).is_file()
                else _compute_ref(model, examples, ref_path, cfg, pad_id, policy_dir))
    train(model, examples, "dpo", cfg, out_dir, ref_logps=refs, pad_id=pad_id, tokenizer_dir=policy_dir,
          desc=f"DPO ({cfg.loss})")
    return {**info, **summary(out_dir)}


def checkpoints(policy_dir) -> list[str]:
    """The candidates for model selection (Eq. 7): ckpt-{step} in step order, then final."""
    policy_dir = Path(policy_dir)
    ckpts = sorted((p.name for p in policy_dir.glob("ckpt-*") if (p / "config.json").is_file()),
                   key=lambda n: int(n.split("-")[1]))
    return ckpts + (["final"] if (policy_dir / "final" / "config.json").is_file() else [])


def summary(train_dir) -> dict:
    """steps, losses, and `reward_acc`: the mean implicit-reward accuracy over the last epoch's steps."""
    from mt.train import metrics_summary
    out = metrics_summary(train_dir)
    if "accuracy" in out:
        out["reward_acc"] = out.pop("accuracy")
    return out


# ---- main


def main(cfg: C.Config, pairs_file: str | None = None) -> dict:
    """The whole E-step (or, with pairs_file, offline DPO / IPO / SimPO on ready pairs)."""
    dist.init_distributed(None if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    need = ["policy"] + ([] if pairs_file else ["rm", "prompts"])
    missing = [k for k in need if not getattr(cfg, k)]
    if missing:
        raise C.ConfigError(f"missing --{', --'.join(missing)}")
    if dist.get().is_main:
        out.mkdir(parents=True, exist_ok=True)
        C.save(cfg, out / "config.json")

    def step(name, path, fn):
        if Path(path).exists():
            dist.print0(f"[skip] {name}: {path} exists (delete it to redo)")
        else:
            fn()

    info = {}
    if pairs_file is None:
        step("sample", out / "samples.jsonl", lambda: sample(cfg.policy, cfg.prompts, out / "samples.jsonl",
                                                             cfg.sampling, cfg.em.n_samples, cfg.seed))
        step("score", out / "scores.jsonl", lambda: score(cfg.rm, out / "samples.jsonl", out / "scores.jsonl"))
        step("pairs", out / "pairs.jsonl", lambda: pairs(out / "samples.jsonl", out / "scores.jsonl",
                                                         out / "pairs.jsonl", cfg.em.pair_rule, cfg.em.keep_truncated))
        pairs_file = out / "pairs.jsonl"
    step("ref_logps", out / "ref_logps.jsonl", lambda: ref_logps(cfg.policy, pairs_file, out / "ref_logps.jsonl", cfg.dpo))
    info = dpo(cfg.policy, pairs_file, out / "ref_logps.jsonl", out / "policy", cfg.dpo)
    dist.print0(f"E-step done: {json.dumps(info)}; checkpoints {checkpoints(out / 'policy')} in {out / 'policy'}")
    return info


def parse(argv: list[str]) -> tuple[C.Config, str | None]:
    """mt/config.py flags plus --pairs FILE (train on ready pairs instead of sampling)."""
    argv, pairs_file = list(argv), None
    for i, a in enumerate(argv):
        if a == "--pairs" or a.startswith("--pairs="):
            pairs_file = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
            if pairs_file is None:
                raise C.ConfigError("--pairs: missing file name")
            del argv[i:i + (1 if "=" in a else 2)]
            break
    return C.parse_args(argv), pairs_file


if __name__ == "__main__":
    dist.run(lambda: main(*parse(sys.argv[1:])))
