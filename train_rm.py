"""The M-step, standalone: Bradley-Terry training of a reward model (Eq. 5) on one or more pairs files.

    python train_rm.py --rm DIR --pairs pairs.jsonl --out runs/rm
    python train_rm.py --rm POLICY_DIR --pairs a.jsonl,b.jsonl --out runs/rm     # fresh score head on a causal LM
    torchrun --nproc_per_node 8 train_rm.py --rm DIR --pairs pairs.jsonl --out runs/rm

Paper defaults (appendix B): batch 512, lr 2e-6, 1 epoch, cosine with warmup 0.1, max length 2048; flags
are mt/config.py's `--rm_train.*`. --out becomes a Hugging Face directory (loads with
AutoModelForSequenceClassification) with metrics.jsonl beside the weights; a rerun resumes or skips.
"""
from __future__ import annotations

import json
import sys

import torch

from mt import config as C
from mt import dist

# ---- train


def train(init_dir, pair_files: list, out_dir, cfg: C.RMConfig) -> dict:
    """r_t from init_dir (an RM, or a causal LM given a fresh score head) on the pairs of every file.

    out_dir is the new RM's Hugging Face directory. Returns the training summary.
    """
    from mt.chat import load_tokenizer
    from mt.data import read_pairs
    from mt.train import load_for_training, rm_examples
    from mt.train import train as run_training
    tok = load_tokenizer(init_dir)
    rows = [p for f in pair_files for p in read_pairs(f)]
    examples, dropped = rm_examples(tok, rows, cfg.max_length)
    if dropped:
        dist.print0(f"dropped {dropped} of {len(rows)} pairs longer than max_length={cfg.max_length} tokens "
                    "(--rm_train.max_length)")
    torch.manual_seed(cfg.seed)  # a fresh score head is drawn on rank 0 (FSDP broadcasts it): reproducible
    model = load_for_training(init_dir, cfg, head="score")
    if model.cfg.hf.get("pad_token_id") is None:
        # transformers' sequence classifiers need a pad id to batch; ours read lengths and do not care
        model.cfg.hf["pad_token_id"] = tok.pad_token_id
    run_training(model, examples, "rm", cfg, out_dir, pad_id=tok.pad_token_id or 0, tokenizer_dir=init_dir,
                 final_dir=out_dir, desc="RM (Bradley-Terry)")
    return {"pairs": len(rows), "dropped_too_long": dropped, **summary(out_dir)}


# ---- evaluate


def pair_accuracy(rm_dir, pairs_path) -> float:
    """Share of pairs with r(chosen) > r(rejected), strictly (ties count as errors)."""
    from mt.data import read_pairs
    from mt.scoring import score_conversations
    rows = read_pairs(pairs_path)
    s = score_conversations(rm_dir, [(p.prompt, p.chosen) for p in rows] + [(p.prompt, p.rejected) for p in rows],
                            desc="pair accuracy")
    n = len(rows)
    return sum(c > r for c, r in zip(s[:n], s[n:])) / n


def summary(rm_dir) -> dict:
    """steps, losses, and `train_acc`: the mean pair accuracy over the last epoch's steps."""
    from mt.train import metrics_summary
    out = metrics_summary(rm_dir)
    if "accuracy" in out:
        out["train_acc"] = out.pop("accuracy")
    return out


# ---- main


def main(cfg: C.Config, pair_files: list) -> dict:
    dist.init_distributed(None if cfg.device == "auto" else cfg.device)
    if not cfg.rm or not pair_files:
        raise C.ConfigError("train_rm.py needs --rm DIR (an RM or a causal LM) and --pairs FILE[,FILE...]")
    info = train(cfg.rm, pair_files, cfg.out, cfg.rm_train)
    dist.print0(f"RM done: {json.dumps(info)} -> {cfg.out}")
    return info


def parse(argv: list[str]) -> tuple[C.Config, list[str]]:
    """mt/config.py flags plus --pairs FILE[,FILE...] (repeatable)."""
    rest, files = [], []
    it = iter(argv)
    for a in it:
        if a == "--pairs" or a.startswith("--pairs="):
            v = a.split("=", 1)[1] if "=" in a else next(it, None)
            if not v:
                raise C.ConfigError("--pairs: missing file name")
            files += [f for f in v.split(",") if f]
        else:
            rest.append(a)
    return C.parse_args(rest), files


if __name__ == "__main__":
    dist.run(lambda: main(*parse(sys.argv[1:])))
