r"""The E-step, standalone: sample from π_{t-1}, score with r_{t-1}, build pairs,
DPO against π_{t-1} (Eq. 4).

    python train_policy.py --policy DIR --rm DIR --prompts FILE --out runs/estep
    python train_policy.py --policy DIR --pairs pairs.jsonl --out runs/dpo \
        --dpo.loss simpo   # offline baselines
    torchrun --nproc_per_node 8 train_policy.py --policy DIR --rm DIR --prompts FILE \
        --out runs/estep

Flags are mt/config.py's (`--dpo.beta 0.05`, `--em.pair_rule max_min`, `--sampling.temperature
1.0`, `--preset tiny`; `--help` lists them). Writes, under --out (DESIGN.md §2): samples.jsonl,
scores.jsonl, pairs.jsonl (+ .stats.json), ref_logps.jsonl, policy/ckpt-{step}/ and policy/final/
(Hugging Face directories), policy/metrics.jsonl, and config.json + manifest.json: a rerun skips
the finished steps (mt/manifest.py, as run_em.py does), resumes DPO from its last checkpoint, and
refuses changed flags. Each step is also a function here, so run_em.py calls them one by one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mt import chat
from mt import config as C
from mt import dist, hub, track
from mt.chat import Example
from mt.checkpoint import load_for_training, load_model, read_config
from mt.data import (DataError, read_pairs, read_prompts, read_samples, read_scores, write_json,
                     write_jsonl)
from mt.em import make_pairs
from mt.flags import ConfigError
from mt.losses import LOSSES, preference_objective
from mt.manifest import Manifest
from mt.progress import progress as progress_bar
from mt.sampler import sample_to_file, summary_line
from mt.scoring import score_file
from mt.packing import Packing
from mt.train import Padded, TrainError, metrics_summary, train

# ---- E-step / sample: M responses per prompt from π_{t-1} (T=0.8, top-p 0.95)


@dist.releases  # the stage's model (and optimizer, cache) freed on return (DESIGN.md §4)
def sample(policy_dir: Path, prompts_path: Path, out_path: Path, sampling: C.SamplingConfig,
           n: int = 5, seed: int = 0, stream: str = "policy") -> dict:
    """samples.jsonl for every prompt of prompts_path; data-parallel over ranks.
    Returns the summary."""
    d = dist.get()
    head = read_config(policy_dir).head
    if head != "lm":
        raise C.ConfigError(f"{policy_dir}: has a {head!r} head (a reward model); sampling needs a "
                            "causal LM (*ForCausalLM). Fix: give the policy's directory")
    tok = chat.load_tokenizer(policy_dir)
    prompts = read_prompts(prompts_path)
    chat.check_prompt_lengths(tok, prompts, sampling.max_prompt_tokens, prompts_path, policy_dir)
    model = load_model(policy_dir, "auto", d.device).eval()
    s = sample_to_file(model, tok, prompts, sampling, out_path, seed=seed,
                       stream=stream, n=n, stop_ids=chat.stop_ids(tok, policy_dir), source=prompts_path)
    dist.print0(summary_line(s) + f" -> {out_path}")
    return s


# ---- E-step / score: every response scored by r_{t-1}


@dist.releases  # the stage's model (and optimizer, cache) freed on return (DESIGN.md §4)
def score(rm_dir: Path, samples_path: Path, out_path: Path) -> dict:
    rows = score_file(rm_dir, samples_path, out_path)
    return {"prompts": len(rows), "responses": sum(len(r["scores"]) for r in rows)}


# ---- E-step / pairs (appendix B "Length control", or max/min)


def pairs(samples_path: Path, scores_path: Path, out_path: Path, rule: str = "length_control",
          keep_truncated: bool = False) -> dict:
    """pairs.jsonl plus pairs.stats.json (pairs kept, prompts dropped and why)."""
    samples, scores = read_samples(samples_path), read_scores(scores_path)  # each names its file
    try:
        rows, stats = make_pairs(samples, scores, rule, keep_truncated)
    except ValueError as e:  # samples and scores that do not belong together
        raise DataError(f"{scores_path}: {e}. Fix: score {samples_path} again") from None
    stats = dict(stats)
    if dist.get().is_main:
        write_jsonl(out_path, rows)
        write_json(Path(out_path).with_suffix(".stats.json"), stats)
    dist.barrier()
    dropped = ", ".join(f"{k[8:]} {v}" for k, v in stats.items()
                        if k.startswith("dropped_")) or "none"
    dist.print0(f"pairs ({rule}): {stats.get('pairs', 0)} from {stats.get('prompts', 0)} prompts; "
                f"dropped {dropped}")
    return stats


# ---- E-step / reference log-probs: once, with the frozen π_{t-1}, before any update


@dist.releases  # the stage's model (and optimizer, cache) freed on return (DESIGN.md §4)
def ref_logps(policy_dir: Path, pairs_path: Path, out_path: Path, loss: str = "dpo",
              max_length: int = 2048, micro_batch_size: int = 2, dtype: str = "auto",
              packing: bool = True, share_prompt: bool = True,
              micro_batch_tokens: int = 0) -> dict:
    """ref_logps.jsonl: summed log-probs of chosen and rejected under π_{t-1}, keyed by pair id.

    Takes only the DPO settings the reference pass depends on, so a run that changes another
    (β, lr) keeps its reference log-probs (mt/manifest.py records exactly these arguments)."""
    cfg = C.DPOConfig(loss=loss, max_length=max_length, micro_batch_size=micro_batch_size,
                      dtype=dtype, packing=packing, share_prompt=share_prompt,
                      micro_batch_tokens=micro_batch_tokens)
    model, examples, info, pad_id = _policy_and_examples(policy_dir, pairs_path, cfg)
    _compute_ref(model, examples, out_path, cfg, pad_id, policy_dir)
    return info


@torch.no_grad()
def reference_logps(model, examples: list[Example], micro_batch_size: int, pad_id: int = 0,
                    progress: bool = True, full_logits: bool = False, packing: bool = True,
                    share_prompt: bool = True,
                    micro_batch_tokens: int = 0) -> dict[str, tuple[float, float]]:
    """Summed log-probs of chosen and rejected responses under `model`,
    data-parallel: {pair id: (c, r)}. The head is fused with the log-softmax at response positions
    (mt/logps.py response_logps: no (2b, T, V) logits); `full_logits=True` is the reference path.
    Packed micro-batches (mt/packing.py) unless `packing=False`, as in training.

    no_grad, not inference_mode: inference tensors would break the FSDP training forward that
    follows.
    """
    d = dist.get()
    dev = dist.model_device(model)
    layout = (Packing(examples, True, share_prompt, micro_batch_size, micro_batch_tokens, pad_id,
                      dev) if packing else Padded(examples, True, micro_batch_size, pad_id, dev))
    order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
    micro = layout.micro(order, d.rank, d.world_size)  # equal forwards on every rank
    local = []
    bar = progress_bar(len(micro), "reference log-probs", progress and d.is_main, unit="batch")
    for idx in micro:
        batch = layout.batch([examples[i] for i in (idx or order[:1])])
        lp = batch.logps(model, full_logits=full_logits)  # (2b,)
        if idx:
            local.append((idx, lp.view(2, -1).T))
        bar.update(1)
    bar.close()
    # host sync once, at the end
    rows = [(i, *v) for idx, lp in local for i, v in zip(idx, lp.tolist())]
    out = {}
    for part in dist.gather_objects(rows):
        for i, c, r in part:
            out[examples[i].key] = (c, r)
    return out


def write_ref_logps(path, examples: list[Example], refs: dict[str, tuple[float, float]],
                    ref_dir: str = ""):
    write_jsonl(path, ({"pair_id": e.key, "prompt_id": e.prompt_id,
                        "ref_chosen_logps": refs[e.key][0], "ref_rejected_logps": refs[e.key][1],
                        "ref": str(ref_dir)} for e in examples))


def read_ref_logps(path, examples: list[Example] | None = None) -> dict[str, tuple[float, float]]:
    """{pair id: (chosen, rejected)}; with `examples`, every example must be present."""
    path = Path(path)
    refs = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                refs[row["pair_id"]] = (float(row["ref_chosen_logps"]),
                                        float(row["ref_rejected_logps"]))
            except (ValueError, KeyError, TypeError) as e:
                raise TrainError(f"{path}:{n}: bad reference log-prob row ({type(e).__name__}: "
                                 f"{e}). Fix: delete the file so it is recomputed") from None
    for e in examples or []:
        if e.key not in refs:
            raise TrainError(f"{path}: no reference log-probs for pair {e.key} (prompt_id "
                             f"{e.prompt_id!r}); the file was made for other pairs. Fix: delete "
                             "it so it is recomputed")
    return refs


def reference_args(cfg: C.DPOConfig) -> dict:
    """The DPO settings ref_logps takes."""
    args = {"loss": cfg.loss, "max_length": cfg.max_length,
            "micro_batch_size": cfg.micro_batch_size, "dtype": cfg.dtype}
    # the layout's settings only where they differ from the defaults: the manifest records these
    # arguments, and a run begun before packing existed keeps its finished reference pass
    default = C.DPOConfig()
    args.update({k: getattr(cfg, k) for k in ("packing", "share_prompt", "micro_batch_tokens")
                 if getattr(cfg, k) != getattr(default, k)})
    return args


def _policy_and_examples(policy_dir, pairs_path, cfg: C.DPOConfig):
    tok = chat.load_tokenizer(policy_dir)
    pair_rows = read_pairs(pairs_path)
    examples, dropped = chat.policy_examples(tok, pair_rows, cfg.max_length)
    if dropped:
        dist.print0(f"{pairs_path}: dropped {dropped} of {len(pair_rows)} pairs longer than "
                    f"max_length={cfg.max_length} tokens (--dpo.max_length)")
    model = load_for_training(policy_dir, cfg)  # under FSDP only rank 0 reads the weights
    return (model, examples, {"pairs": len(pair_rows), "dropped_too_long": dropped},
            tok.pad_token_id or 0)


def _compute_ref(model, examples, out_path, cfg, pad_id, policy_dir):
    uses_ref = LOSSES[cfg.loss].uses_reference
    # no gradients: twice the training micro-batch fits
    refs = (reference_logps(model, examples, 2 * cfg.micro_batch_size, pad_id,
                            packing=cfg.packing, share_prompt=cfg.share_prompt,
                            micro_batch_tokens=2 * cfg.micro_batch_tokens)
            if uses_ref else {})
    if dist.get().is_main:
        write_ref_logps(out_path, [e for e in examples if e.key in refs], refs, policy_dir)
    dist.barrier()
    return refs


# ---- E-step / DPO (Eq. 4): β=0.01, batch 128, lr 7e-7, cosine, warmup 0.1,
# checkpoint every 50 steps


@dist.releases  # the stage's model (and optimizer, cache) freed on return (DESIGN.md §4)
def dpo(policy_dir: Path, pairs_path: Path, ref_path: Path, out_dir: Path,
        cfg: C.DPOConfig) -> dict:
    """Train π_t from π_{t-1} on pairs_path; reference log-probs from ref_path
    (computed there if missing)."""
    model, examples, info, pad_id = _policy_and_examples(policy_dir, pairs_path, cfg)
    refs = None
    if LOSSES[cfg.loss].uses_reference:
        refs = (read_ref_logps(ref_path, examples) if Path(ref_path).is_file()
                else _compute_ref(model, examples, ref_path, cfg, pad_id, policy_dir))
    train(model, examples, preference_objective(cfg.loss), cfg, out_dir, ref_logps=refs,
          pad_id=pad_id, tokenizer_dir=policy_dir, desc=f"DPO ({cfg.loss})")
    return {**info, **summary(out_dir)}


def checkpoints(policy_dir) -> list[str]:
    """The candidates for model selection (Eq. 7): ckpt-{step} in step order, then final."""
    policy_dir = Path(policy_dir)
    ckpts = sorted((p.name for p in policy_dir.glob("ckpt-*") if (p / "config.json").is_file()),
                   key=lambda n: int(n.split("-")[1]))
    return ckpts + (["final"] if (policy_dir / "final" / "config.json").is_file() else [])


def summary(train_dir) -> dict:
    """steps, losses, and `reward_acc`: the mean implicit-reward accuracy over the last epoch's
    steps."""
    out = metrics_summary(train_dir)
    if "accuracy" in out:
        out["reward_acc"] = out.pop("accuracy")
    return out


# ---- main


def main(cfg: C.StageConfig) -> dict:
    """The whole E-step (or, with --pairs, offline DPO / IPO / SimPO on ready pairs)."""
    dist.init_from(cfg)
    hub.resolve_flags(cfg, "policy", "rm")  # a Hub id (org/name) -> its cached snapshot
    need = ["policy", "out"] + ([] if cfg.pairs else ["rm", "prompts"])
    missing = [k for k in need if not getattr(cfg, k)]
    if missing:
        raise ConfigError(f"missing --{', --'.join(missing)} (see --help)")
    out = Path(cfg.out)
    m = Manifest(out, cfg, cfg.force_config)
    track.start(cfg.log, out, C.to_dict(cfg))  # --log.tensorboard / --log.wandb (rank 0)
    pairs_file = Path(cfg.pairs) if cfg.pairs else out / "pairs.jsonl"
    if not cfg.pairs:
        m.stage("sample", sample, [out / "samples.jsonl"], policy_dir=Path(cfg.policy),
                prompts_path=Path(cfg.prompts), out_path=out / "samples.jsonl",
                sampling=cfg.sampling, n=cfg.em.n_samples, seed=cfg.seed)
        m.stage("score", score, [out / "scores.jsonl"], rm_dir=Path(cfg.rm),
                samples_path=out / "samples.jsonl", out_path=out / "scores.jsonl")
        m.stage("pairs", pairs, [pairs_file, pairs_file.with_suffix(".stats.json")],
                samples_path=out / "samples.jsonl",
                scores_path=out / "scores.jsonl", out_path=pairs_file, rule=cfg.em.pair_rule,
                keep_truncated=cfg.em.keep_truncated)
    m.stage("ref_logps", ref_logps, [out / "ref_logps.jsonl"], policy_dir=Path(cfg.policy),
            pairs_path=pairs_file, out_path=out / "ref_logps.jsonl", **reference_args(cfg.dpo))
    info = m.stage("dpo", dpo, [out / "policy"], policy_dir=Path(cfg.policy),
                   pairs_path=pairs_file, ref_path=out / "ref_logps.jsonl", out_dir=out / "policy",
                   cfg=cfg.dpo)
    dist.print0(f"E-step done: {json.dumps(info)}; checkpoints {checkpoints(out / 'policy')} in "
                f"{out / 'policy'}")
    track.finish()
    return info


if __name__ == "__main__":
    dist.run(lambda: main(C.parse(sys.argv[1:], C.StageConfig(), "python train_policy.py",
                                  __doc__)))
