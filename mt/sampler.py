"""The KV-cached batched sampler: on-policy responses, fast, exact and reproducible by construction.

    python -m mt.sampler --model DIR --prompts FILE --n 5 --out samples.jsonl      # one process
    torchrun --nproc_per_node 8 -m mt.sampler --model DIR --prompts FILE --num-samples 5 --out samples.jsonl

How it works (gpt-fast / nanochat style, one file):
- A preallocated cache of `slots` rows. Every job (prompt i, sample j) runs in one slot; when a job
  stops, the next pending job takes its slot at the next check (continuous refill), so one long
  response does not hold the batch.
- Each prompt is prefilled once (all but its last token) and that prefix is copied to the slots of
  its samples; the first decode step then feeds the last prompt token, so every slot decodes alike.
- Randomness is counter-based: token t of job (seed, stream, prompt id, j) takes Gumbel noise from a
  hash of that tuple, t and the token id, and is argmax(logits / T + noise) over the top-k / top-p set.
  No generator state is shared between rows, so the output does not depend on slot count, batch,
  world size or order.
- The decode loop stays on the device; the host looks at the finished flags every `check_every` steps.
  Once nothing is pending, the live rows are packed to the front so the tail decodes only them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from mt import chat, checkpoint, dist
from mt.config import ConfigError, SamplingConfig, check_sampling, opt, parse
from mt.data import read_prompts, write_jsonl
from mt.model import KVCache, Transformer

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward; bounds the prefill's activation memory
WINDOW = 64  # decode attends over the cache's first positions, rounded up to this many (fewer shapes)


@dataclass
class Completion:
    token_ids: list[int]  # the generated ids; ends with the stop id when finish_reason == "stop"
    finish_reason: str  # "stop" (a stop id was sampled) | "length" (max_new_tokens reached, truncated)
    logps: list[float] | None = None  # per token, under the untempered, unfiltered policy

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# ---- counter-based randomness

M32 = 0xFFFFFFFF


def stream_key(seed: int, stream: str, prompt_id: str, sample_index: int) -> int:
    """The 64-bit key of one response's random stream; `stream` names the use, e.g. "iter1/policy"."""
    h = hashlib.sha256(f"{seed}\x1f{stream}\x1f{prompt_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (C. Wellons' hash-prospector) on uint32 values held in int64; both multipliers are
    # below 2^31, so no product overflows int64 and the result is the same on every backend
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def gumbel(keys: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise (S, V) for token `step` (S,) of each row's stream, keys (S, 2) = its uint32 halves.

    Noise is indexed by token id, so a row's draw depends only on its own logits, key and step.
    """
    dev = keys.device
    row = _mix32(keys[:, 0] ^ _mix32(keys[:, 1] ^ _mix32(step)))  # (S,) this step's seed
    h = _mix32(row[:, None] ^ _mix32(torch.arange(vocab, device=dev)))  # (S, V) 32 random bits per token
    # 1 - U with 32-bit resolution near 0, where the largest noise values (the ones that win) come from
    v = ((h.float() + 0.5) * 2.0 ** -32).clamp(max=1.0 - 2.0 ** -24)
    return -torch.log(-torch.log1p(-v))  # -log(E), E = -log(1 - v) ~ Exp(1)


# ---- one token from the logits


def next_token(logits: torch.Tensor, noise: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Tokens (S,) from fp32 logits (S, V): greedy, or Gumbel-max over the tempered, filtered logits.

    top-k keeps the k most likely tokens (and ties with the k-th); top-p then keeps, of what is left
    (renormalised), the smallest most-likely set whose mass reaches p. argmax(logits / T + Gumbel noise)
    over the kept set draws from softmax(logits / T) renormalised on it (the Gumbel-max trick); unlike
    an inverse CDF over the vocabulary, a tiny change in one logit can flip the draw only when two
    noisy scores nearly tie, so fp rounding that differs with the batch shape almost never matters.
    """
    if cfg.greedy or cfg.temperature <= 0:
        return logits.argmax(-1)
    scores = logits / cfg.temperature  # (S, V)
    if cfg.top_k > 0 and cfg.top_k < scores.size(-1):
        kth = scores.topk(cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        sorted_p = probs.sort(dim=-1, descending=True).values
        n_keep = ((sorted_p.cumsum(-1) - sorted_p) < cfg.top_p).sum(-1, keepdim=True)  # mass before < p
        p_min = sorted_p.gather(1, n_keep - 1)  # the least likely token kept
        scores = scores.masked_fill(probs < p_min, float("-inf"))
    return (scores + noise).argmax(-1)


# ---- the engine


class _Window:
    """The first `rows` slots and `max_len` positions of a KVCache, as views: a decode step attends over
    the longest live sequence, not the whole cache. Writes through the views land in the cache."""

    def __init__(self, cache: KVCache, rows: int, max_len: int):
        self.cache, self.rows, self.max_len = cache, rows, max_len

    @property
    def k(self) -> torch.Tensor:  # (L, rows, H, max_len, D)
        return self.cache.k[:, : self.rows, :, : self.max_len]

    @property
    def v(self) -> torch.Tensor:
        return self.cache.v[:, : self.rows, :, : self.max_len]


@dataclass
class _Rows:
    """The engine's per-row state, row s = cache slot s: device tensors (row first), host lists.

    `set` and `pack` act on fields by name or on all of them, so a new per-row field is declared
    (and allocated in `new`) here and nothing else has to remember it; `refill` sets the fields a
    job starts from. A field left None (out_logp without return_logps) is skipped.
    """
    # device
    last: torch.Tensor  # (S,) the next input token
    pos: torch.Tensor  # (S,) its position
    n_gen: torch.Tensor  # (S,) tokens generated so far
    done: torch.Tensor  # (S,) bool: finished or empty rows stop advancing
    key: torch.Tensor  # (S, 2) the job's stream key, two uint32 halves
    out: torch.Tensor  # (S, max_new_tokens + 1) ids; +1: a finished row writes junk past its end
    out_logp: torch.Tensor | None  # (S, max_new_tokens + 1) their logps, with return_logps
    # host
    slot_job: list[tuple[int, int] | None]  # the job (prompt i, sample j) in each row; None = free
    pos_host: list[int]  # an upper bound on each row's position, exact after every harvest

    @classmethod
    def new(cls, S: int, max_new_tokens: int, return_logps: bool, dev) -> "_Rows":
        T1 = max_new_tokens + 1

        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=dev)
        return cls(last=z(S), pos=z(S), n_gen=z(S), done=~z(S, dtype=torch.bool), key=z(S, 2),
                   out=z(S, T1), out_logp=z(S, T1, dtype=torch.float32) if return_logps else None,
                   slot_job=[None] * S, pos_host=[0] * S)

    def set(self, rows: list[int], **values):
        """Write fields of `rows`: a list (one value per row; one host-to-device copy for a device
        field) or one value for all of them."""
        idx = torch.tensor(rows, device=self.last.device)
        for name, v in values.items():
            f = getattr(self, name)
            if isinstance(f, torch.Tensor):
                f[idx] = torch.tensor(v, device=f.device) if isinstance(v, list) else v
            else:
                for r, x in zip(rows, v if isinstance(v, list) else [v] * len(rows)):
                    f[r] = x

    def pack(self, rows: list[int]):
        """Move `rows` (in this order) to the front: every field, device and host."""
        idx, k = torch.tensor(rows, device=self.last.device), len(rows)
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, torch.Tensor):
                t[:k] = t[idx]
            elif t is not None:
                t[:k] = [t[s] for s in rows]


class _Engine:
    """One sampling pass: jobs (prompt i, sample j) flow through a fixed set of cache slots.

    Device state is one row per slot; the host keeps which job each slot runs and looks at the device
    only in `harvest` (every `check_every` steps).
    """

    def __init__(self, model: Transformer, prompts: list[list[int]], n: int, cfg: SamplingConfig,
                 keys: list[list[int]], stop_ids, return_logps: bool):
        self.model, self.prompts, self.n, self.cfg, self.keys = model, prompts, n, cfg, keys
        self.jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]  # a prompt's samples are adjacent
        self.next_job = 0
        self.results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        param = next(model.parameters())
        dev, dtype = param.device, param.dtype
        self.dev = dev
        S = self.S = min(cfg.slots, len(self.jobs))
        prefix_max = max(len(p) for p in prompts) - 1  # the last prompt token is fed by the first decode step
        self.max_len = prefix_max + 1 + cfg.max_new_tokens
        self.cache = KVCache(model.cfg, S, self.max_len, dtype, dev)
        self.stage = KVCache(model.cfg, 1, max(prefix_max, 1), dtype, dev)  # a prompt whose samples span refills
        self.staged = None  # which prompt's prefix `stage` holds
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
        self.return_logps = return_logps
        self.decode = compiled(model) if cfg.compile else model  # prefill stays eager: one pass per prompt
        # per-row state, one row per slot; rows [0, m) are in use (m shrinks in the tail: compact)
        self.m = S
        self.rows = _Rows.new(S, cfg.max_new_tokens, return_logps, dev)

    def _copy(self, dst: KVCache, dst_rows: list[int], src: KVCache, src_rows: list[int], length: int):
        if length == 0 or not dst_rows:
            return
        d, s = torch.tensor(dst_rows, device=self.dev), torch.tensor(src_rows, device=self.dev)
        dst.k[:, d, :, :length] = src.k[:, s, :, :length]  # every layer at once
        dst.v[:, d, :, :length] = src.v[:, s, :, :length]

    def _prefill(self, items: list[tuple[int, int]]):
        """Write the prefixes of prompts into slots, items = [(prompt i, slot)], in forwards of at most
        PREFILL_TOKENS padded tokens."""
        P = self.prompts
        items = [(i, s) for i, s in items if len(P[i]) > 1]
        while items:
            k, L = 1, len(P[items[0][0]]) - 1  # grow the chunk while its padded size fits the budget
            while k < len(items) and (k + 1) * max(L, len(P[items[k][0]]) - 1) <= PREFILL_TOKENS:
                L = max(L, len(P[items[k][0]]) - 1)
                k += 1
            chunk, items = items[:k], items[k:]
            ids = torch.zeros(len(chunk), L, dtype=torch.long)  # right-padded: pad keys are never attended
            for r, (i, _) in enumerate(chunk):
                ids[r, : len(P[i]) - 1] = torch.tensor(P[i][:-1])
            positions = torch.arange(L, device=self.dev)[None].expand(len(chunk), L)
            slots = torch.tensor([s for _, s in chunk], device=self.dev)
            self.model(ids.to(self.dev), positions=positions, cache=_Window(self.cache, self.S, L),
                       slots=slots, return_hidden=True)

    def refill(self, free: list[int]):
        """Start the next pending jobs in the free slots; each prompt's prefix is computed once and copied."""
        P, cache = self.prompts, self.cache
        take = self.jobs[self.next_job: self.next_job + len(free)]
        self.next_job += len(take)
        assign = list(zip(free, take))
        slots_of: dict[int, list[int]] = {}
        for s, (i, _) in assign:
            slots_of.setdefault(i, []).append(s)
        staged = take[0][0] if take[0][1] > 0 else None  # begun in an earlier refill: prefix is in `stage`
        if staged is not None:
            assert staged == self.staged
            self._copy(cache, slots_of[staged], self.stage, [0] * len(slots_of[staged]), len(P[staged]) - 1)
        fresh = [i for i in slots_of if i != staged]
        self._prefill([(i, slots_of[i][0]) for i in fresh])
        siblings = [(s, slots_of[i][0], len(P[i]) - 1) for i in fresh for s in slots_of[i][1:]]
        if siblings:  # one batched copy; junk past a shorter prompt's prefix is harmless
            dst, src, lengths = zip(*siblings)
            self._copy(cache, list(dst), cache, list(src), max(lengths))
        last_i, last_j = take[-1]
        if last_j < self.n - 1 and last_i != staged:  # its other samples start later: keep its prefix
            self._copy(self.stage, [0], cache, [slots_of[last_i][0]], len(P[last_i]) - 1)
            self.staged = last_i
        # the jobs' start state, one small host-to-device copy per device field
        keys = [self.keys[i][j] for i, j in take]
        self.rows.set([s for s, _ in assign], last=[P[i][-1] for i, _ in take],
                      pos=[len(P[i]) - 1 for i, _ in take], n_gen=0, done=False,
                      key=[[k & M32, (k >> 32) & M32] for k in keys],
                      slot_job=list(take), pos_host=[len(P[i]) - 1 for i, _ in take])

    def step(self, window: int):
        """One token for every row in use; no host sync."""
        m, R = self.m, self.rows
        last, pos, n_gen, done = R.last[:m], R.pos[:m], R.n_gen[:m], R.done[:m]
        logits = self.decode(last[:, None], positions=pos[:, None],
                             cache=_Window(self.cache, m, window))[:, -1].float()  # (m, V)
        greedy = self.cfg.greedy or self.cfg.temperature <= 0
        noise = None if greedy else gumbel(R.key[:m], n_gen, logits.size(-1))
        tok = next_token(logits, noise, self.cfg)
        rows = torch.arange(m, device=self.dev)
        R.out[rows, n_gen] = tok
        if self.return_logps:  # under the untempered policy, whatever temperature / top-p / top-k did
            R.out_logp[rows, n_gen] = F.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
        live = (~done).long()
        n_gen.add_(live)
        pos.add_(live)
        last.copy_(tok)
        done.logical_or_(torch.isin(tok, self.stop) | (n_gen >= self.cfg.max_new_tokens))

    def harvest(self) -> int:
        """Collect finished jobs (the one host sync) and free their slots; returns how many finished."""
        m, R = self.m, self.rows
        done_h, n_h, pos_h = R.done[:m].tolist(), R.n_gen[:m].tolist(), R.pos[:m].tolist()
        fin = [s for s in range(m) if R.slot_job[s] is not None and done_h[s]]
        if fin:
            idx = torch.tensor(fin, device=self.dev)
            toks = R.out[idx].tolist()
            logps = R.out_logp[idx].tolist() if self.return_logps else None
            stops = set(self.stop.tolist())
            for r, s in enumerate(fin):
                ids = toks[r][: n_h[s]]
                reason = "stop" if ids and ids[-1] in stops else "length"
                i, j = R.slot_job[s]
                self.results[i][j] = Completion(ids, reason, logps[r][: n_h[s]] if logps else None)
            R.set(fin, slot_job=None, pos=0)  # an empty row idles at position 0, inside any window
        R.pos_host[:m] = [pos_h[s] if R.slot_job[s] is not None else 0 for s in range(m)]
        return len(fin)

    def compact(self):
        """When no job is pending and at most half the rows are live, move the live rows to the front and
        decode only those: the tail of a pass (a few long responses) then costs what its live rows cost."""
        R = self.rows
        live = [s for s in range(self.m) if R.slot_job[s] is not None]
        if not live or len(live) > self.m // 2 or self.next_job < len(self.jobs):
            return
        idx, k = torch.tensor(live, device=self.dev), len(live)
        L = min(self.max_len, max(R.pos_host[: self.m]) + 1)
        self.cache.k[:, :k, :, :L] = self.cache.k[:, idx, :, :L]  # every layer at once
        self.cache.v[:, :k, :, :L] = self.cache.v[:, idx, :, :L]
        R.pack(live)
        self.m = k

    def run(self, progress: bool) -> list[list[Completion]]:
        every = _check_every(self.cfg, self.dev)
        bar = _progress(len(self.jobs), progress)
        self.refill(list(range(self.S)))
        while any(job is not None for job in self.rows.slot_job[: self.m]):
            # no row is past hi, and none moves more than one per step
            hi = max(self.rows.pos_host[: self.m])
            for _ in range(every):
                self.step(min(self.max_len, -(-(hi + 1) // WINDOW) * WINDOW))  # the window covers every row
                hi += 1
            bar.update(self.harvest())
            free = [s for s in range(self.m) if self.rows.slot_job[s] is None]
            if free and self.next_job < len(self.jobs):
                self.refill(free)
            self.compact()
        bar.close()
        return self.results


def compiled(model: Transformer):
    """The model under torch.compile. dynamic=True: the decode batch (rows in use) and the attention window
    (a multiple of WINDOW) change during a pass, and graphs with symbolic sizes serve them all instead of a
    compile per shape. Dynamo caches by code and guards, not by wrapper or model object, so the next pass, or
    the next checkpoint of the same shape, reuses the graphs; the wrapper holds no model beyond its pass."""
    return torch.compile(model, dynamic=True)


def _check_every(cfg: SamplingConfig, device: torch.device) -> int:
    if cfg.check_every > 0:
        return cfg.check_every
    # on CPU a host read costs nothing (no queue to drain); on a GPU it stalls the launch queue
    return 1 if device.type == "cpu" else 8


@torch.no_grad()  # not inference_mode: its tensors break the next FSDP training step (DESIGN.md §4)
def generate(model: Transformer, prompts: list[list[int]], cfg: SamplingConfig, keys: list[list[int]] | None = None,
             stop_ids: list[int] = (), n: int = 1, return_logps: bool = False,
             progress: bool = False) -> list[list[Completion]]:
    """n completions for each prompt (token ids), as [prompt][sample]; keys[i][j] seeds job (i, j)'s stream."""
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} has no tokens")
    if keys is None:
        keys = [[stream_key(0, "", str(i), j) for j in range(n)] for i in range(len(prompts))]
    if not prompts or n == 0:
        return [[] for _ in prompts]
    return _Engine(model, prompts, n, cfg, keys, stop_ids, return_logps).run(progress)


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="sampling", unit="resp", disable=not enabled, dynamic_ncols=True)


# ---- prompts in, samples.jsonl rows out


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Under FSDP2, all-gather the weights once for a whole sampling pass instead of once per token, and
    reshard every sharded module afterwards (DESIGN.md §4). A plain module passes through unchanged.

    While gathered, a forward runs no collective, so ranks may decode different numbers of steps.
    """
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # each module's own reshard-after-forward setting (the root's differs from the blocks'), restored after
    before = [any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)
              for m in sharded]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, flag in zip(sharded, before):
            m.reshard()
            m.set_reshard_after_forward(flag, recurse=False)


def sample(model: Transformer, tok, prompts: list, cfg: SamplingConfig, seed: int = 0, stream: str = "sample",
           n: int = 1, stop_ids: list[int] | None = None, return_logps: bool = False,
           progress: bool = False) -> list[dict]:
    """samples.jsonl rows, in input order, for prompt rows {"prompt_id", "prompt"} (this process only).

    `stream` names the use ("iter1/policy", "iter1/d_ms/ckpt-50", ...) so independent passes draw
    independent randomness; the same (seed, stream, prompt id, sample index) always gives the same response.
    With return_logps the rows also carry "token_ids" and "logps" (untempered) per response.
    """
    ids = []
    for p in prompts:
        x = chat.encode_prompt(tok, p["prompt"])
        if len(x) > cfg.max_prompt_tokens:
            raise ValueError(f"prompt {p['prompt_id']!r} is {len(x)} tokens, over "
                             f"max_prompt_tokens={cfg.max_prompt_tokens}. Fix: raise "
                             "--sampling.max_prompt_tokens or drop this prompt from the prompt file")
        ids.append(x)
    stops = chat.stop_ids(tok) if stop_ids is None else list(stop_ids)
    keys = [[stream_key(seed, stream, p["prompt_id"], j) for j in range(n)] for p in prompts]
    with gathered(model):
        done = generate(model, ids, cfg, keys, stops, n=n, return_logps=return_logps, progress=progress)
    rows = []
    for p, comps in zip(prompts, done):
        # the stop id is dropped from the text explicitly (not every stop id is a "special" token)
        texts = [tok.decode(c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids, skip_special_tokens=True)
                 for c in comps]
        row = {"prompt_id": p["prompt_id"], "prompt": p["prompt"], "responses": texts,
               "finish_reasons": [c.finish_reason for c in comps], "num_tokens": [c.num_tokens for c in comps]}
        if return_logps:
            row["token_ids"] = [c.token_ids for c in comps]
            row["logps"] = [c.logps for c in comps]
        rows.append(row)
    return rows


def sample_to_file(model: Transformer, tok, prompts: list, cfg: SamplingConfig, out, seed: int = 0,
                   stream: str = "sample", n: int = 1, stop_ids: list[int] | None = None,
                   return_logps: bool = False, progress: bool = True) -> dict:
    """Data-parallel sampling to one samples.jsonl: rank r takes prompts[r::world] and writes its shard,
    rank 0 merges the shards in input order (atomically). Returns the global summary on every rank."""
    d = dist.get()
    out = Path(out)
    t0 = time.perf_counter()
    rows = sample(model, tok, dist.shard(prompts), cfg, seed, stream, n, stop_ids, return_logps,
                  progress and d.is_main)
    seconds = time.perf_counter() - t0
    if d.world_size == 1:
        write_jsonl(out, rows)
    else:
        shard = out.with_name(f"{out.name}.rank{d.rank}-of-{d.world_size}")
        write_jsonl(shard, rows)
        dist.barrier()
        if d.is_main:
            shards = [out.with_name(f"{out.name}.rank{r}-of-{d.world_size}") for r in range(d.world_size)]
            by_id = {}
            for f in shards:
                with open(f, encoding="utf-8") as fh:
                    for line in fh:
                        row = json.loads(line)
                        by_id[row["prompt_id"]] = row
            write_jsonl(out, (by_id[p["prompt_id"]] for p in prompts))  # the prompt file's order, whatever the world size
            for f in shards:
                os.unlink(f)
        dist.barrier()
    local = [len(rows), sum(len(r["responses"]) for r in rows), sum(sum(r["num_tokens"]) for r in rows),
             sum(r["finish_reasons"].count("length") for r in rows), seconds]
    parts = dist.gather_objects(local)
    n_prompts, n_resp, n_tok, n_trunc = (sum(p[k] for p in parts) for k in range(4))
    wall = max(p[4] for p in parts)
    return {"prompts": n_prompts, "responses": n_resp, "tokens": n_tok, "seconds": wall,
            "tokens_per_s": n_tok / max(wall, 1e-9), "truncated": n_trunc / max(n_resp, 1)}


def summary_line(s: dict) -> str:
    return (f"sampled {s['prompts']} prompts -> {s['responses']} responses, {s['tokens']} tokens in "
            f"{s['seconds']:.1f}s ({s['tokens_per_s']:.0f} tokens/s), {100 * s['truncated']:.1f}% truncated")


# ---- command line
# Its imports sit here rather than at the top while the engine above is being restructured; they move
# up with the next edit there.



@dataclass
class SamplerArgs:
    """python -m mt.sampler: responses for every prompt of a prompt file, as samples.jsonl."""
    model: str = ""  # (required) Hugging Face causal-LM directory (weights + tokenizer)
    prompts: str = ""  # (required) prompt file (.jsonl / .json / .parquet)
    out: str = ""  # (required) samples.jsonl to write
    n: int = opt(5, min=1)  # responses per prompt (M)
    # the same as --n, for torchrun, whose own parser rejects --n as ambiguous; 0 = --n
    num_samples: int = opt(0, min=0)
    stream: str = "sample"  # names this pass's random streams
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16", "fp16"))  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu | cuda | cuda:N
    logps: bool = False  # also write token_ids and untempered logps
    seed: int = 0  # with --stream, names the random streams (same seed, same responses)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def require(args, *keys: str) -> None:
    """A usage error naming every required key left empty."""
    missing = [k for k in keys if not getattr(args, k)]
    if missing:
        raise ConfigError(f"missing --{', --'.join(missing)} (--help lists every key)")


def parse_args(argv: list[str] | None = None) -> SamplerArgs:
    doc = "\n\n".join(__doc__.split("\n\n")[:2])  # the title and the example commands
    a = parse(sys.argv[1:] if argv is None else list(argv), SamplerArgs(), "python -m mt.sampler", doc)
    require(a, "model", "prompts", "out")
    check_sampling(a.sampling)
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    d = dist.init_distributed(None if a.device == "auto" else a.device)
    prompts = read_prompts(a.prompts)
    tok = chat.load_tokenizer(a.model)
    model = checkpoint.load_model(a.model, dtype=a.dtype, device=d.device).eval()
    s = sample_to_file(model, tok, prompts, a.sampling, a.out, seed=a.seed, stream=a.stream,
                       n=a.num_samples or a.n, stop_ids=chat.stop_ids(tok, a.model), return_logps=a.logps)
    dist.print0(summary_line(s) + f" -> {a.out}")
    return s


if __name__ == "__main__":
    try:
        dist.run(main)
    except ConfigError as e:  # a usage error: the message names the flag, no traceback
        sys.exit(f"python -m mt.sampler: error: {e}")
