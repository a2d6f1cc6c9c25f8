"""Scoring responses with a reward model: length-sorted batches, data-parallel, results in input order.

Used by the E-step (r_{t-1} scores the M samples), model selection, pseudo-pair filtering and eval/.
Each whole chat is rendered with the RM's OWN tokenizer and template (the policy's may differ).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from mt import dist
from mt.chat import encode_conversation, load_tokenizer
from mt.checkpoint import CheckpointError, load_model, read_config
from mt.data import pad_sequences, read_samples, write_jsonl


def load_rm(path, device=None, dtype="auto"):
    """A reward model directory (score head) and its tokenizer; dtype auto = bf16 on GPU, fp32 on CPU."""
    device = torch.device(device or dist.get().device)
    if read_config(path).head != "score":
        raise CheckpointError(f"{path}: is a causal LM, not a reward model (config.json architectures must end in "
                              "ForSequenceClassification); train one with train_rm.py first")
    return load_model(path, dtype, device).eval(), load_tokenizer(path)  # load_model resolves "auto"


@torch.no_grad()
def score_conversations(rm, items: list[tuple[list[dict], str]], tok=None, batch_size: int = 64,
                        max_tokens: int = 32768, device=None, dtype="auto", progress: bool = True,
                        desc: str = "scoring") -> list[float]:
    """r(x, y) for every (messages, response), on every rank, in input order.

    `rm` is a reward-model directory, or a loaded model with its `tok`. Rank r scores items[r::world];
    within a rank, longest first into batches of <= max_tokens padded tokens and <= batch_size rows,
    right-padded, each score read at the row's last real token (by length, never by pad id).
    """
    if isinstance(rm, (str, Path)):
        rm, tok = load_rm(rm, device, dtype)
    elif tok is None:
        raise ValueError("score_conversations(model, items) needs the reward model's own tokenizer: tok=...")
    d = dist.get()
    dev = next(rm.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    mine = list(range(len(items)))[d.rank::d.world_size]
    seqs = {i: encode_conversation(tok, *items[i]) for i in mine}
    order = sorted(mine, key=lambda i: -len(seqs[i]))
    bar = tqdm(total=len(items), desc=desc, unit="resp", disable=not (progress and d.is_main), dynamic_ncols=True)
    local, pending = [], []
    j = 0
    while j < len(order):
        T = len(seqs[order[j]])  # the longest remaining: it sets this batch's width
        n = max(1, min(batch_size, max_tokens // max(T, 1), len(order) - j))
        idx = order[j:j + n]
        j += n
        ids, lengths = pad_sequences([seqs[i] for i in idx], pad)  # right-padded (n, T), (n,)
        pending.append((idx, rm.rewards(ids.to(dev), lengths=lengths.to(dev)).float()))  # (n,)
        bar.update(n * d.world_size)  # the other ranks advance at about the same pace
    bar.close()
    for idx, s in pending:  # host sync once, after every forward was queued
        local += list(zip(idx, s.tolist()))
    out = [0.0] * len(items)
    for part in dist.gather_objects(local):
        for i, s in part:
            out[i] = s
    return out


def score_samples(rm, samples, tok=None, **kw) -> list[dict]:
    """scores.jsonl rows {"prompt_id", "scores"} aligned with each samples row's responses."""
    rows = list(samples)
    items = [(r["prompt"], y) for r in rows for y in r["responses"]]
    flat = score_conversations(rm, items, tok, **kw)
    out, k = [], 0
    for r in rows:
        n = len(r["responses"])
        out.append({"prompt_id": r["prompt_id"], "scores": flat[k:k + n]})
        k += n
    return out


def score_file(rm_dir, samples_path, out_path, device=None, dtype="auto", **kw) -> list[dict]:
    """Read samples.jsonl, score every response with the RM in rm_dir, write scores.jsonl (rank 0, atomic)."""
    t0 = time.perf_counter()
    rm, tok = load_rm(rm_dir, device, dtype)
    samples = read_samples(samples_path)
    rows = score_samples(rm, samples, tok, **kw)
    if dist.get().is_main:
        write_jsonl(out_path, rows)
    dist.barrier()
    n = sum(len(r["scores"]) for r in rows)
    dist.print0(f"scored {n} responses of {len(rows)} prompts with {rm_dir} in {time.perf_counter() - t0:.1f}s "
                f"-> {Path(out_path)}")
    return rows
