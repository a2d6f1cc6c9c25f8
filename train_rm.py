r"""The M-step, standalone: Bradley-Terry training of a reward model (Eq. 5) on one
or more pairs files.

    python train_rm.py --rm DIR --pairs pairs.jsonl --out runs/rm
    python train_rm.py --rm POLICY_DIR --pairs a.jsonl,b.jsonl \
        --out runs/rm     # fresh score head on a causal LM
    torchrun --nproc_per_node 8 train_rm.py --rm DIR --pairs pairs.jsonl --out runs/rm

Paper defaults (appendix B): batch 512, lr 2e-6, 1 epoch, cosine with warmup 0.1, max length 2048;
flags are mt/config.py's `--rm_train.*` (`--help` lists them). The new RM is written to OUT/final/
(a Hugging Face directory that loads with AutoModelForSequenceClassification), metrics to
OUT/metrics.jsonl; a rerun resumes or skips (mt/manifest.py), and refuses changed flags.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mt import config as C
from mt import dist, hub, track
from mt.chat import load_tokenizer, rm_examples
from mt.checkpoint import load_for_training
from mt.data import read_pairs
from mt.flags import ConfigError
from mt.losses import BRADLEY_TERRY
from mt.manifest import Manifest
from mt.scoring import score_conversations
from mt.train import metrics_summary, train as run_training

# ---- train


@dist.releases  # the stage's model (and optimizer, cache) freed on return (DESIGN.md §4)
def train(init_dir: Path, pair_files: list[Path], out_dir: Path, cfg: C.RMConfig) -> dict:
    """r_t from init_dir (an RM, or a causal LM given a fresh score head) on the pairs of every
    file.

    The new RM's Hugging Face directory is out_dir/final. Returns the training summary.
    """
    tok = load_tokenizer(init_dir)
    rows = [p for f in pair_files for p in read_pairs(f)]
    examples, dropped = rm_examples(tok, rows, cfg.max_length)
    if dropped:
        dist.print0(f"dropped {dropped} of {len(rows)} pairs longer than "
                    f"max_length={cfg.max_length} tokens (--rm_train.max_length)")
    # a fresh score head is drawn on rank 0 (FSDP broadcasts it): reproducible
    torch.manual_seed(cfg.seed)
    model = load_for_training(init_dir, cfg, head="score")
    # The pad id only fills our batches (we read lengths). The RM's files get a pad id that never
    # occurs in text, chosen where they are written (mt.checkpoint.save_model), so transformers'
    # classifiers, which pool at the last non-pad token, score the token we trained on.
    run_training(model, examples, BRADLEY_TERRY, cfg, out_dir, pad_id=tok.pad_token_id or 0,
                 tokenizer_dir=init_dir, desc="RM (Bradley-Terry)")
    final = out_dir / "final"
    pad_id = json.loads((final / "config.json").read_text()).get("pad_token_id")
    if dist.get().is_main and pad_id != tok.pad_token_id:
        print(f"{final}: pad token {load_tokenizer(final).pad_token!r} (id {pad_id}) in place of "
              f"the init's {tok.pad_token!r} (id {tok.pad_token_id}), which can occur in a chat",
              flush=True)
    return {"pairs": len(rows), "dropped_too_long": dropped, **summary(out_dir)}


# ---- evaluate


@dist.releases  # the stage's model (and optimizer, cache) freed on return (DESIGN.md §4)
def pair_accuracy(rm_dir, pairs_path) -> float:
    """Share of pairs with r(chosen) > r(rejected), strictly (ties count as errors)."""
    rows = read_pairs(pairs_path)
    items = ([(p["prompt"], p["chosen"]) for p in rows]
             + [(p["prompt"], p["rejected"]) for p in rows])
    s = score_conversations(rm_dir, items, desc="pair accuracy")
    n = len(rows)
    return sum(c > r for c, r in zip(s[:n], s[n:])) / n


def summary(rm_dir) -> dict:
    """steps, losses, and `train_acc`: the mean pair accuracy over the last epoch's steps."""
    out = metrics_summary(rm_dir)
    if "accuracy" in out:
        out["train_acc"] = out.pop("accuracy")
    return out


# ---- main


def main(cfg: C.StageConfig) -> dict:
    dist.init_from(cfg)
    hub.resolve_flags(cfg, "rm")  # a Hub id (org/name) -> its cached snapshot
    pair_files = [Path(f) for f in cfg.pairs.split(",") if f]
    if not cfg.rm or not pair_files or not cfg.out:
        raise ConfigError("train_rm.py needs --rm DIR (an RM or a causal LM), --pairs "
                            "FILE[,FILE...] and --out DIR (see --help)")
    out = Path(cfg.out)
    m = Manifest(out, cfg, cfg.force_config)
    track.start(cfg.log, out, C.to_dict(cfg))  # --log.tensorboard / --log.wandb (rank 0)
    info = m.stage("rm", train, [out / "final"], init_dir=Path(cfg.rm), pair_files=pair_files,
                   out_dir=out, cfg=cfg.rm_train)
    dist.print0(f"RM done: {json.dumps(info)} -> {out / 'final'}")
    track.finish()
    return info


if __name__ == "__main__":
    dist.run(lambda: main(C.parse(sys.argv[1:], C.StageConfig(), "python train_rm.py", __doc__)))
