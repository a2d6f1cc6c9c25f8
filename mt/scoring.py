"""Scoring responses with a reward model: length-sorted batches, data-parallel,
results in input order.

Used by the E-step (r_{t-1} scores the M samples), model selection, pseudo-pair filtering and
eval/. Each whole chat is rendered with the RM's OWN tokenizer and template (the policy's may
differ).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mt import dist
from mt.chat import Example, encode_conversation, load_tokenizer
from mt.checkpoint import CheckpointError, load_model, read_config
from mt.data import pad_sequences, read_samples, write_jsonl
from mt.packing import Packing
from mt.progress import progress as progress_bar


def load_rm(path, device=None, dtype="auto"):
    """A reward model directory (score head) and its tokenizer;
    dtype auto = bf16 on GPU, fp32 on CPU."""
    device = torch.device(device or dist.get().device)
    if read_config(path).head != "score":
        raise CheckpointError(f"{path}: is a causal LM, not a reward model (config.json "
                              "architectures must end in ForSequenceClassification); train one "
                              "with train_rm.py first")
    # load_model resolves "auto"
    return load_model(path, dtype, device).eval(), load_tokenizer(path)


@torch.no_grad()
def score_conversations(rm, items: list[tuple[list[dict], str]], tok=None, batch_size: int = 64,
                        max_tokens: int = 32768, device=None, dtype="auto", progress: bool = True,
                        desc: str = "scoring", packing: bool = True) -> list[float]:
    """r(x, y) for every (messages, response), on every rank, in input order.

    Each distinct (messages, response) is scored once and its score reused, so the same text always
    gets the same score within a call (batch shapes round differently; identical responses are
    common, and Eq. 6 must see them as ties). Callers that compare scores score all the compared
    texts in one call (score_files). `rm` is a reward-model directory, or a loaded model with its
    `tok`. Rank r scores the distinct items [r::world]; within a rank, longest first into batches
    of <= max_tokens padded tokens and <= batch_size rows, right-padded, each score read at the
    row's last real token (by length, never by pad id). With `packing` (the default), batches are
    packed instead (mt/packing.py): <= max_tokens real tokens each, no padding, no row limit.
    """
    if isinstance(rm, (str, Path)):
        rm, tok = load_rm(rm, device, dtype)
    elif tok is None:
        raise ValueError("score_conversations(model, items) needs the reward model's own "
                         "tokenizer: tok=...")
    keys = [json.dumps(item, ensure_ascii=False, sort_keys=True) for item in items]
    first: dict[str, int] = {}
    for k in keys:
        first.setdefault(k, len(first))
    unique = [None] * len(first)
    for k, item in zip(keys, items):
        unique[first[k]] = item
    scores = _score_distinct(rm, tok, unique, batch_size, max_tokens, progress, desc, packing)
    return [scores[first[k]] for k in keys]


def _score_distinct(rm, tok, items, batch_size, max_tokens, progress, desc,
                    packing) -> list[float]:
    d = dist.get()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    mine = list(range(len(items)))[d.rank::d.world_size]
    seqs = [encode_conversation(tok, *items[i]) for i in mine]
    bar = progress_bar(len(items), desc, progress and d.is_main, unit="resp")
    # the other ranks advance at about the same pace
    pending = score_token_rows(rm, seqs, pad, batch_size, max_tokens, packing,
                               lambda n: bar.update(n * d.world_size))
    bar.close()
    local = []
    for idx, s in pending:  # host sync once, after every forward was queued
        local += [(mine[i], v) for i, v in zip(idx, s.tolist())]
    out = [0.0] * len(items)
    for part in dist.gather_objects(local):
        for i, s in part:
            out[i] = s
    return out


def score_token_rows(rm, seqs: list[list[int]], pad: int, batch_size: int, max_tokens: int,
                     packing: bool, done=lambda n: None) -> list[tuple[list[int], torch.Tensor]]:
    """The RM's score at each token row's last token, as (indices into seqs, scores (n,)) per
    forward, queued without a host sync. Longest first; packed batches of <= max_tokens real tokens,
    or right-padded ones of <= max_tokens padded tokens and <= batch_size rows."""
    dev = next(rm.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    pending = []
    if packing:  # a start at the end: no log-prob targets, only the last token's score is read
        examples = [Example("", "", tuple(seqs[i]), len(seqs[i])) for i in order]
        layout = Packing(examples, False, False, 1, max_tokens, pad, dev)
        for group in layout.micro(list(range(len(order))), 0, 1):
            if not group:  # nothing to score (no collectives here: skip)
                continue
            batch = layout.batch([examples[g] for g in group])
            pending.append(([order[g] for g in group], batch.rewards(rm).float()))  # (n,)
            done(len(group))
        return pending
    j = 0
    while j < len(order):
        T = len(seqs[order[j]])  # the longest remaining: it sets this batch's width
        n = max(1, min(batch_size, max_tokens // max(T, 1), len(order) - j))
        idx = order[j:j + n]
        j += n
        ids, lengths = pad_sequences([seqs[i] for i in idx], pad)  # right-padded (n, T), (n,)
        pending.append((idx, rm.rewards(ids.to(dev), lengths=lengths.to(dev)).float()))  # (n,)
        done(n)
    return pending


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
    """Read samples.jsonl, score every response with the RM in rm_dir,
    write scores.jsonl (rank 0, atomic)."""
    return score_files(rm_dir, [(samples_path, out_path)], device, dtype, **kw)[0]


@dist.releases  # the stage's model (and optimizer, cache) freed on return (DESIGN.md §4)
def score_files(rm_dir, files: list[tuple], device=None, dtype="auto", **kw) -> list[list[dict]]:
    """score_file for several (samples.jsonl, scores.jsonl) at once, in ONE scoring call, so a
    response that appears in two files (y_t^k and y_{t-1} in Eq. 6, y_t
    and y_{t-1} in Eq. 8) gets one score."""
    t0 = time.perf_counter()
    rm, tok = load_rm(rm_dir, device, dtype)
    samples = [read_samples(s) for s, _ in files]
    flat = score_samples(rm, [r for rows in samples for r in rows], tok, **kw)
    out, k = [], 0
    for rows, (_, out_path) in zip(samples, files):
        out.append(flat[k:k + len(rows)])
        k += len(rows)
        if dist.get().is_main:
            write_jsonl(out_path, out[-1])
    dist.barrier()
    n = sum(len(r["scores"]) for r in flat)
    where = ", ".join(str(Path(o)) for _, o in files)
    dist.print0(f"scored {n} responses of {len(flat)} prompts with {rm_dir} in "
                f"{time.perf_counter() - t0:.1f}s -> {where}")
    return out
