"""The KV-cached batched sampler: on-policy responses, fast, exact and reproducible by construction.

    python -m mt.sampler --model DIR --prompts FILE --n 5 --out samples.jsonl      # one process
    torchrun --nproc_per_node 8 -m mt.sampler --model DIR --prompts FILE --num-samples 5 --out samples.jsonl

How it works (gpt-fast / nanochat style; the token rule, one token from the logits, is mt/token_rule.py):
- A preallocated cache of `slots` rows. Every job (prompt i, sample j) runs in one slot; when a job
  stops, the next pending job takes its slot (continuous refill), so one long response does not
  hold the batch. New prompts are prefilled together, in one forward: a refill waits until a
  quarter of the slots (REFILL_GROUP) or every pending job is free, or a slot has idled
  REFILL_WAIT steps.
- Each prompt is prefilled once (all but its last token) and that prefix is copied to the slots of
  its samples; the prefix all prompts share (a chat template's system turn) is prefilled once per
  pass and copied. The first decode step feeds the last prompt token, so every slot decodes alike.
- Randomness is counter-based (mt/token_rule.py): token t of job (seed, stream, prompt id, j) takes
  Gumbel noise from a hash of that tuple, t and the token id, so the output does not depend on slot
  count, batch, world size or order.
- The decode loop stays on the device; the host looks at it every `check_every` steps (harvest),
  and nowhere else. A step draws from each row's first candidate tier (`draft_token`); a row whose
  top-p / top-k set that tier does not hold keeps that step's logits, and the harvest redraws its
  token by the exact rule and takes the row back to that step, so the tokens are next_token's.
  Once nothing is pending, the live rows are packed to the front so the tail decodes only them.

--sampling.compile: the decode step's forward under torch.compile with static shapes, one graph per
bucket: rows = the slot count, then a quarter, a sixteenth, ... of it in the tail (finished rows
are masked, not dropped); attention window = 64 positions times a power of two, or the whole cache,
whose length is max_prompt_tokens + max_new_tokens. On CPU that is inductor's C++ code, what the
tests check (compiling takes seconds per bucket met). On CUDA it is meant for the GPU and not run
here: mode "reduce-overhead", each bucket a CUDA graph replaying into the cache in place. Prefill
and the token rule stay eager everywhere.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from mt import chat, checkpoint, dist, hub
from mt.config import SamplingConfig, check_sampling
from mt.data import read_prompts, write_jsonl
from mt.flags import ConfigError, opt, parse
from mt.model import KVCache, PagedKVCache, Transformer, kv_bytes_per_position
from mt.progress import progress as progress_bar
from mt.token_rule import M32, draft_token, next_token, stream_key

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward; bounds the prefill's activation memory
WINDOW = 64  # decode attends over the cache's first positions, rounded up to this many (fewer shapes)
# refill when this share of the slots is free (one prefill forward), or a slot idled this long
REFILL_GROUP = 0.25
REFILL_WAIT = 8
SHARE_PREFIX = True  # prefill the prefix all prompts share once (off: bench_sampler.py's ablation)
PAGE = 128  # positions per block of the paged cache: FlexAttention's default key block


@dataclass
class Completion:
    token_ids: list[int]  # the generated ids; ends with the stop id when finish_reason == "stop"
    finish_reason: str  # "stop" (a stop id was sampled) | "length" (max_new_tokens reached, truncated)
    logps: list[float] | None = None  # per token, under the untempered, unfiltered policy

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# ---- the engine


NO_MISS = 1 << 62  # _Rows.miss of a row whose draws are all the rule's: above any step


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
    # the step of the row's first draft draw not known to be the rule's (draft_token), NO_MISS if
    # none, and that step's logits: the harvest redraws it exactly and the row goes on from there
    miss: torch.Tensor  # (S,)
    miss_logits: torch.Tensor | None  # (S, V) fp32, when the rule filters (top-p / top-k)
    # host
    slot_job: list[tuple[int, int] | None]  # the job (prompt i, sample j) in each row; None = free
    pos_host: list[int]  # an upper bound on each row's position, exact after every harvest
    started: list[int]  # when each row's job started (refill count): the last started waits first
    # the paged cache's: each row's block table (the PagedKVCache's own tensor) and its blocks
    table: torch.Tensor | None = None  # (S, max_len // PAGE) pool blocks, 0 = scratch
    blocks: list[list[int]] | None = None

    @classmethod
    def new(cls, S: int, max_new_tokens: int, return_logps: bool, vocab: int | None, dev) -> "_Rows":
        T1 = max_new_tokens + 1

        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=dev)
        return cls(last=z(S), pos=z(S), n_gen=z(S), done=~z(S, dtype=torch.bool), key=z(S, 2),
                   out=z(S, T1), out_logp=z(S, T1, dtype=torch.float32) if return_logps else None,
                   miss=z(S) + NO_MISS,
                   miss_logits=z(S, vocab, dtype=torch.float32) if vocab else None,
                   slot_job=[None] * S, pos_host=[0] * S, started=[0] * S)

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


HEADROOM = 6 << 30  # GPU bytes left beside the KV cache: activations, logits, the prefill


def fit_slots(model_cfg, elem_bytes: int, slots: int, max_len: int, free_bytes: int) -> int:
    """The most slots, up to `slots`, whose dense KV cache of max_len positions (and the two one-row
    prefix caches) fits in free_bytes less HEADROOM: at the paper's caps an 8B row takes 0.75 GiB, so
    128 slots (96 GiB) do not fit on an 80 GB GPU; fewer slots give the same tokens, more slowly."""
    row = kv_bytes_per_position(model_cfg, elem_bytes) * max_len
    return max(1, min(slots, (free_bytes - HEADROOM) // row - 2))


def pool_blocks(model_cfg, elem_bytes: int, slots: int, max_len: int, kv_blocks: int,
                free_bytes: int | None) -> int:
    """The paged cache's blocks (block 0 is scratch): --sampling.kv_blocks, or every slot's longest
    row, on a GPU at most what free_bytes less HEADROOM holds. Rows then hold what they use: at the
    paper's caps an 8B row may grow to 6,144 positions, but most end far shorter, so 128 rows fit
    where 74 dense slots do; when they outgrow the pool the row started last waits."""
    one = -(-max_len // PAGE)
    n = kv_blocks or slots * one + 1
    if not kv_blocks and free_bytes is not None:
        block = kv_bytes_per_position(model_cfg, elem_bytes) * PAGE
        n = min(n, (free_bytes - HEADROOM) // block)
    if n < one + 1:
        where = (f"--sampling.kv_blocks={kv_blocks}" if kv_blocks else
                 f"the free GPU memory ({(free_bytes or 0) / 2**30:.1f} GiB)")
        raise ConfigError(f"{where}: the paged KV cache must hold one row of {max_len} positions, "
                          f"{one + 1} blocks of {PAGE} (one is scratch). Fix: raise "
                          "--sampling.kv_blocks (0 = sized for every slot), or lower "
                          "--sampling.max_prompt_tokens / --sampling.max_new_tokens")
    return n


def _common_prefix(seqs: list[list[int]]) -> int:
    """The length of the longest prefix every sequence starts with."""
    first, n = seqs[0], min(map(len, seqs))
    for other in seqs[1:]:
        n = next((t for t in range(n) if other[t] != first[t]), n)
    return n


def cache_sizes(cfg: SamplingConfig, jobs: int, longest_prompt: int, shared: int) -> dict[str, tuple[int, int]]:
    """(rows, positions) of each KVCache a pass allocates: `cache` (the slots), `stage` (one prompt's prefix
    kept across refills), `common` (the prefix every prompt shares). The engine allocates these and
    mt/plan.py sizes them, so the plan cannot drift from the sampler."""
    prefix_max = longest_prompt - 1  # the last prompt token is fed by the first decode step
    slots = cfg.slots if cfg.compile else min(cfg.slots, jobs)
    max_len = prefix_max + 1 + cfg.max_new_tokens
    if cfg.compile:  # one cache shape for every pass of this config
        max_len = max(max_len, cfg.max_prompt_tokens + cfg.max_new_tokens)
    return {"cache": (slots, max_len), "stage": (1, max(prefix_max, 1)), "common": (1, max(shared, 1))}


class _Engine:
    """One sampling pass: jobs (prompt i, sample j) flow through a fixed set of cache slots.

    Device state is one row per slot; the host keeps which job each slot runs and looks at the device
    only in `harvest` (every `check_every` steps). With `static` (--sampling.compile) every shape a
    decode step sees is one of a few buckets: the row count is the slot count, or a quarter, a
    sixteenth, ... of it once the tail is compacted; the attention window is 64 positions times a
    power of two, or the whole cache, whose length is fixed by the config (max_prompt_tokens +
    max_new_tokens), not by this pass's prompts. Without it the rows and window fit more tightly.
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
        self.static = cfg.compile
        # the prefix all prompts start with (a chat template's system turn): prefilled once, copied
        share = SHARE_PREFIX and len(prompts) > 1
        self.shared = _common_prefix([p[:-1] for p in prompts]) if share else 0
        sizes = cache_sizes(cfg, len(self.jobs), max(len(p) for p in prompts), self.shared)
        (S, self.max_len), stage, common = sizes["cache"], sizes["stage"], sizes["common"]
        self.paged = cfg.kv_cache == "paged" or (cfg.kv_cache == "auto" and dev.type == "cuda")
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
        if self.paged:  # rows take blocks as they grow; more rows than blocks wait their turn
            n = pool_blocks(model.cfg, param.element_size(), S, self.max_len, cfg.kv_blocks, free)
            self.cache = PagedKVCache(model.cfg, S, n, PAGE, self.max_len, dtype, dev)
            self.free_blocks = list(range(n - 1, 0, -1))  # pop() takes the lowest; 0 is scratch
            self.peak_blocks = self.preempted = 0  # most blocks held at once; rows sent back to wait
            self.hold = False
        elif dev.type == "cuda":  # never more slots than the free memory holds (the same tokens)
            fit = fit_slots(model.cfg, param.element_size(), S, self.max_len, free)
            if fit < S:
                print(f"[rank {dist.get().rank}] sampling: {S} slots of {self.max_len} positions do not fit "
                      f"in the free GPU memory; {fit} slots (--sampling.slots)", file=sys.stderr, flush=True)
            S = fit
        self.S = S
        if not self.paged:
            self.cache = KVCache(model.cfg, S, self.max_len, dtype, dev)
        self.stage = KVCache(model.cfg, *stage, dtype, dev)  # a prompt whose samples span refills
        self.staged = None  # which prompt's prefix `stage` holds
        self.common = KVCache(model.cfg, *common, dtype, dev)
        if self.shared:
            ids = torch.tensor([prompts[0][: self.shared]], device=dev)
            at = torch.arange(self.shared, device=dev)[None]
            self.model(ids, positions=at, cache=self.common, return_hidden=True)
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
        self.return_logps = return_logps
        self.decode = compiled(model, dev) if cfg.compile else model  # prefill stays eager
        if cfg.compile and dev.type == "cuda":  # CUDA graphs replay into the cache in place (a
            # new cache, next pass: the graphs are re-recorded at its address, not recompiled)
            torch._dynamo.mark_static_address(self.cache.k)
            torch._dynamo.mark_static_address(self.cache.v)
        # per-row state, one row per slot; rows [0, m) are in use (m shrinks in the tail: compact)
        self.m = S
        self.every = _check_every(cfg, dev)
        self.rows = _Rows.new(S, cfg.max_new_tokens, return_logps,
                              missed_logits_vocab(cfg, model.cfg.vocab_size, dev), dev)
        if self.paged:
            self.rows.table, self.rows.blocks = self.cache.table, [[] for _ in range(S)]
            self.cache.whole = self.static
        self.requeue: list[tuple[int, int]] = []  # jobs that waited for blocks, in job order
        self.refills = 0
        self.idle = 0  # decode steps since a slot became free while jobs were pending
        self.prefills = 0  # prefill forwards run (for the benchmark)

    def window(self, need: int) -> int:
        """The attention window for positions [0, need): a multiple of WINDOW (static: a power of
        two times it), at most the whole cache."""
        w = -(-need // WINDOW)
        if self.static:
            w = 1 << (w - 1).bit_length()
        return min(self.max_len, w * WINDOW)

    def _copy(self, dst, dst_rows: list[int], src, src_rows: list[int], length: int):
        """Positions [0, length) of src's rows into dst's, every layer at once; either cache may be
        paged (a position past a row's blocks reads or writes the scratch block)."""
        if length == 0 or not dst_rows:
            return
        d, s = torch.tensor(dst_rows, device=self.dev), torch.tensor(src_rows, device=self.dev)
        at = torch.arange(length, device=self.dev)
        for name in ("k", "v"):
            a, b = getattr(src, name), getattr(dst, name)
            if isinstance(src, PagedKVCache):  # (L, H, r, length, D) -> (L, r, H, length, D)
                x = a[:, 0][:, :, src.where(src.table[s], at.expand(len(s), length))].transpose(1, 2)
            else:
                x = a[:, s, :, :length]
            if isinstance(dst, PagedKVCache):
                b[:, 0][:, :, dst.where(dst.table[d], at.expand(len(d), length))] = x.transpose(1, 2)
            else:
                b[:, d, :, :length] = x

    # ---- the paged cache's blocks: taken on the host before the steps that write them (no sync)

    def _blocks(self, upto: int) -> int:
        """Blocks that hold positions [0, upto]."""
        return min(upto, self.max_len - 1) // PAGE + 1

    def _take(self, rows: list[int], upto: list[int]):
        """Give each row blocks through position upto (the caller checked there are enough)."""
        R, writes = self.rows, []
        for s, u in zip(rows, upto):
            while len(R.blocks[s]) < self._blocks(u):
                writes.append((s, len(R.blocks[s]), self.free_blocks[-1]))
                R.blocks[s].append(self.free_blocks.pop())
        if writes:
            r, c, b = (torch.tensor(x, device=self.dev) for x in zip(*writes))
            R.table[r, c] = b
        self.peak_blocks = max(self.peak_blocks, self.cache.n_blocks - 1 - len(self.free_blocks))

    def _release(self, rows: list[int]):
        R = self.rows
        for s in rows:
            self.free_blocks.extend(reversed(R.blocks[s]))
            R.blocks[s] = []
        R.set(rows, table=0)  # a row's writes go to scratch until it takes blocks again

    def grow(self, steps: int):
        """Blocks for the next `steps` decode steps of every live row. When the pool is short, the
        rows started last give theirs back and wait (their jobs go back to the queue and restart
        from the prompt; counter-based noise draws the same tokens), never an out-of-memory error."""
        R = self.rows
        live = [s for s in range(self.m) if R.slot_job[s] is not None]
        want = {s: self._blocks(R.pos_host[s] + steps - 1) - len(R.blocks[s]) for s in live}
        short = sum(want.values()) - len(self.free_blocks)
        for s in sorted(live, key=lambda s: -R.started[s])[:-1]:  # the first started always stays
            if short <= 0:
                break
            short -= want.pop(s) + len(R.blocks[s])
            bisect.insort(self.requeue, R.slot_job[s])
            self.preempted += 1
            self.hold = True  # no job starts until a row finishes: a restart now would only be sent back
            self._release([s])
            R.set([s], slot_job=None, pos=0, pos_host=0, done=True, miss=NO_MISS)
        self._take(list(want), [R.pos_host[s] + steps - 1 for s in want])

    def _startable(self, jobs: list[tuple[int, int]]) -> int:
        """How many of `jobs` (in order) the free blocks can start: each needs its prompt and the
        first check interval, beside what the live rows take in that interval."""
        R, n = self.rows, len(self.free_blocks)
        n -= sum(self._blocks(R.pos_host[s] + self.every - 1) - len(R.blocks[s])
                 for s in range(self.m) if R.slot_job[s] is not None)
        for k, (i, _) in enumerate(jobs):
            n -= self._blocks(len(self.prompts[i]) - 2 + self.every)
            if n < 0:
                return k
        return len(jobs)

    def _prefill(self, items: list[tuple[int, int]]):
        """Write the prefixes of prompts into slots, items = [(prompt i, slot)]: the shared prefix
        by a copy, the rest in forwards of at most PREFILL_TOKENS padded tokens."""
        P, c = self.prompts, self.shared
        self._copy(self.cache, [s for _, s in items], self.common, [0] * len(items), c)
        items = [(i, s) for i, s in items if len(P[i]) - 1 > c]
        rest = {i: len(P[i]) - 1 - c for i, _ in items}  # the tokens each prompt still needs
        while items:
            k, L = 1, rest[items[0][0]]  # grow the chunk while its padded size fits the budget
            while k < len(items) and (k + 1) * max(L, rest[items[k][0]]) <= PREFILL_TOKENS:
                L = max(L, rest[items[k][0]])
                k += 1
            chunk, items = items[:k], items[k:]
            ids = torch.zeros(len(chunk), L, dtype=torch.long)  # right-padded: pad keys are never attended
            for r, (i, _) in enumerate(chunk):
                ids[r, : rest[i]] = torch.tensor(P[i][c:-1])
            positions = torch.arange(c, c + L, device=self.dev)[None].expand(len(chunk), L)
            slots = torch.tensor([s for _, s in chunk], device=self.dev)
            cache = self.cache if self.paged else _Window(self.cache, self.S, c + L)
            self.model(ids.to(self.dev), positions=positions, cache=cache, slots=slots,
                       return_hidden=True)
            self.prefills += 1

    def refill(self, free: list[int]):
        """Start the next pending jobs in the free slots; each prompt's prefix is computed once and copied."""
        P, cache = self.prompts, self.cache
        # jobs that waited for blocks first, then the queue
        take = (self.requeue + self.jobs[self.next_job: self.next_job + len(free)])[: len(free)]
        if self.paged:
            take = [] if self.hold else take[: self._startable(take)]
        if not take:
            return
        again = min(len(take), len(self.requeue))
        del self.requeue[:again]
        self.next_job += len(take) - again
        assign = list(zip(free, take))
        if self.paged:
            self._take(free[: len(take)], [len(P[i]) - 2 + self.every for i, _ in take])
        slots_of: dict[int, list[int]] = {}
        for s, (i, _) in assign:
            slots_of.setdefault(i, []).append(s)
        # begun in an earlier refill: its prefix is in `stage`
        staged = self.staged if self.staged in slots_of else None
        if staged is not None:
            self._copy(cache, slots_of[staged], self.stage, [0] * len(slots_of[staged]), len(P[staged]) - 1)
        fresh = [i for i in slots_of if i != staged]
        self._prefill([(i, slots_of[i][0]) for i in fresh])
        siblings = [(s, slots_of[i][0], len(P[i]) - 1) for i in fresh for s in slots_of[i][1:]]
        if siblings:  # one batched copy; junk past a shorter prompt's prefix is harmless
            dst, src, lengths = zip(*siblings)
            self._copy(cache, list(dst), cache, list(src), max(lengths))
        nxt = self.jobs[self.next_job][0] if self.next_job < len(self.jobs) else None
        if nxt in slots_of and nxt != staged:  # its other samples start later: keep its prefix
            self._copy(self.stage, [0], cache, [slots_of[nxt][0]], len(P[nxt]) - 1)
            self.staged = nxt
        # the jobs' start state, one small host-to-device copy per device field
        keys = [self.keys[i][j] for i, j in take]
        self.rows.set([s for s, _ in assign], last=[P[i][-1] for i, _ in take],
                      pos=[len(P[i]) - 1 for i, _ in take], n_gen=0, done=False, miss=NO_MISS,
                      key=[[k & M32, (k >> 32) & M32] for k in keys],
                      slot_job=list(take), pos_host=[len(P[i]) - 1 for i, _ in take],
                      started=self.refills)
        self.refills += 1
        self.idle = 0

    def step(self, window: int):
        """One token for every row in use; no host sync. A row whose top-p / top-k set is not among
        its first candidates (draft_token) keeps this step's logits and goes on with the draft token
        until the harvest redraws it (the rows after it are redone: the draw is not the rule's).
        With a harvest after every step (check_every 1, the CPU default) the step draws by the exact
        rule itself: its tier check is then that step's harvest read, and no redraw repeats work."""
        m, R = self.m, self.rows
        last, pos, n_gen, done = R.last[:m], R.pos[:m], R.n_gen[:m], R.done[:m]
        if self.static and self.dev.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        cache = self.cache if self.paged else _Window(self.cache, m, window)
        logits = self.decode(last[:, None], positions=pos[:, None], cache=cache)[:, -1].float()  # (m, V)
        if self.every == 1:
            tok, exact = next_token(logits, R.key[:m], n_gen, self.cfg), None
        else:
            tok, exact = draft_token(logits, R.key[:m], n_gen, self.cfg)
        if exact is not None:  # a live row's first miss: remember the step and its logits
            miss = R.miss[:m]
            first = ~exact & ~done & (miss > n_gen)
            miss.copy_(torch.where(first, n_gen, miss))
            R.miss_logits[:m] = torch.where(first[:, None], logits, R.miss_logits[:m])
        rows = torch.arange(m, device=self.dev)
        R.out[rows, n_gen] = tok
        if self.return_logps:  # under the untempered policy, whatever temperature / top-p / top-k did
            R.out_logp[rows, n_gen] = logits.gather(1, tok[:, None])[:, 0] - logits.logsumexp(-1)
        live = (~done).long()
        n_gen.add_(live)
        pos.add_(live)
        last.copy_(tok)
        done.logical_or_(torch.isin(tok, self.stop) | (n_gen >= self.cfg.max_new_tokens))

    def harvest(self) -> int:
        """Redraw the rows whose draft draw missed, collect finished jobs and free their slots;
        returns how many finished. The loop's one host sync (a second one only after a redraw)."""
        m, R = self.m, self.rows
        state = torch.stack([R.done[:m].long(), R.n_gen[:m], R.pos[:m], R.miss[:m]])
        done_h, n_h, pos_h, miss_h = state.tolist()
        redo = [s for s in range(m) if R.slot_job[s] is not None and miss_h[s] != NO_MISS]
        if redo:
            self.redraw(redo, [miss_h[s] for s in redo])
            done_h, n_h, pos_h = torch.stack([R.done[:m].long(), R.n_gen[:m], R.pos[:m]]).tolist()
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
            if self.paged:
                self._release(fin)
                self.hold = False
        R.pos_host[:m] = [pos_h[s] if R.slot_job[s] is not None else 0 for s in range(m)]
        return len(fin)

    def redraw(self, rows: list[int], steps: list[int]):
        """Rows back to their first missed step: its token by the exact rule (next_token) from the
        logits kept then, and the row's state as `step` would have left it. What the row computed
        after that step is dropped: its cache positions past it are rewritten before they are read
        (each step writes its position, then attends up to it)."""
        R, dev = self.rows, self.dev
        idx, t = torch.tensor(rows, device=dev), torch.tensor(steps, device=dev)
        logits = R.miss_logits[idx]  # (r, V)
        tok = next_token(logits, R.key[idx], t, self.cfg)
        R.out[idx, t] = tok
        if self.return_logps:
            R.out_logp[idx, t] = logits.gather(1, tok[:, None])[:, 0] - logits.logsumexp(-1)
        start = torch.tensor([len(self.prompts[R.slot_job[s][0]]) - 1 for s in rows], device=dev)
        R.n_gen[idx], R.pos[idx], R.last[idx] = t + 1, start + t + 1, tok
        R.done[idx] = torch.isin(tok, self.stop) | (t + 1 >= self.cfg.max_new_tokens)
        R.miss[idx] = NO_MISS

    def due(self, free: list[int]) -> bool:
        """Refill now? New prompts are prefilled together: wait until a REFILL_GROUP share of the
        slots (or every pending job) is free, or a slot has idled REFILL_WAIT steps, or nothing is
        live."""
        pending = len(self.jobs) - self.next_job + len(self.requeue)
        if not free or not pending:
            return False
        group = min(pending, max(1, round(REFILL_GROUP * self.S)))
        live = any(j is not None for j in self.rows.slot_job[: self.m])
        return len(free) >= group or self.idle >= REFILL_WAIT or not live

    def compact(self):
        """When no job is pending and at most half the rows are live, move the live rows to the
        front and decode only those: the tail of a pass (a few long responses) then costs what its
        live rows cost. Static: to the smallest of m / 4, m / 16, ... rows that holds them, the
        rest empty."""
        R = self.rows
        live = [s for s in range(self.m) if R.slot_job[s] is not None]
        if not live or len(live) > self.m // 2 or self.next_job < len(self.jobs) or self.requeue:
            return
        m = len(live)
        if self.static:
            m = self.m
            while m > 1 and -(-m // 4) >= len(live):
                m = -(-m // 4)
            if m == self.m:
                return
        idx, k = torch.tensor(live, device=self.dev), len(live)
        L = min(self.max_len, max(R.pos_host[: self.m]) + 1)
        if not self.paged:  # paged: the rows' tables move (R.pack), their blocks stay
            self.cache.k[:, :k, :, :L] = self.cache.k[:, idx, :, :L]  # every layer at once
            self.cache.v[:, :k, :, :L] = self.cache.v[:, idx, :, :L]
        R.pack(live)
        if m > k:
            R.set(list(range(k, m)), slot_job=None, pos_host=0, pos=0, done=True,
                  **({"table": 0, "blocks": [[] for _ in range(k, m)]} if self.paged else {}))
        self.m = m

    def run(self, progress: bool) -> list[list[Completion]]:
        every = self.every
        bar = progress_bar(len(self.jobs), "sampling", progress, unit="resp")  # lines in a log
        self.refill(list(range(self.S)))
        while any(job is not None for job in self.rows.slot_job[: self.m]):
            # no row is past hi, and none moves more than one per step
            if self.paged:
                self.grow(every)
            hi = max(self.rows.pos_host[: self.m])
            for _ in range(every):
                self.step(self.window(hi + 1))  # the window covers every row
                hi += 1
            bar.update(self.harvest())
            free = [s for s in range(self.m) if self.rows.slot_job[s] is None]
            if self.due(free):
                self.refill(free)
            elif free and (self.next_job < len(self.jobs) or self.requeue):
                self.idle += every
            self.compact()
        bar.close()
        return self.results

    def kv_stats(self) -> dict:
        """Bytes of K and V: allocated for the slots, and held by rows at the pass's peak (paged:
        the blocks in use; dense: every slot's room for its longest row, used or not)."""
        per_pos = kv_bytes_per_position(self.model.cfg, self.cache.k.element_size())
        held = self.peak_blocks * PAGE if self.paged else self.S * self.max_len
        kind = ("paged, " + ("FlexAttention" if self.cache.flex else "gathered")) if self.paged else "dense"
        return {"kv_cache": kind, "slots": self.S, "bytes_per_position": per_pos,
                "allocated_bytes": self.cache.k.nbytes + self.cache.v.nbytes, "peak_held_bytes": held * per_pos,
                "preempted": self.preempted if self.paged else 0}


def compiled(model: Transformer, device: torch.device):
    """The model under torch.compile with static shapes (dynamic=False): one graph per (rows,
    window) bucket of the decode step, at most log4(slots) + 1 row buckets times
    log2(cache / WINDOW) + 2 windows, each compiled when a pass first meets it. On CUDA,
    mode="reduce-overhead" records each graph as a CUDA graph (the cache's address is marked
    static, so replays write it in place). Dynamo caches by code and guards, not by wrapper or
    model object, so the next pass, or the next checkpoint of the same shape, reuses the graphs;
    the wrapper holds no model beyond its pass."""
    import torch._dynamo.config as dynamo_config  # the compile stack: loaded only for --sampling.compile
    # every bucket is a recompile of the same forward: allow them all (the default stops at 8)
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 256)
    dynamo_config.accumulated_cache_size_limit = max(
        dynamo_config.accumulated_cache_size_limit, 1024)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model, dynamic=False, mode=mode)


def missed_logits_vocab(cfg: SamplingConfig, vocab_size: int, device) -> int | None:
    """The width of the logits each row keeps for the harvest's redraw, or None: the draft draw can
    miss only when the rule filters (draft_token) and the harvest is not every step. The engine
    allocates these and mt/plan.py sizes them."""
    filters = not (cfg.greedy or cfg.temperature <= 0) and (cfg.top_k > 0 or cfg.top_p < 1.0)
    return vocab_size if filters and _check_every(cfg, torch.device(device)) > 1 else None


def _check_every(cfg: SamplingConfig, device: torch.device) -> int:
    if cfg.check_every > 0:
        return cfg.check_every
    # on CPU a host read costs nothing (no queue to drain); on a GPU it stalls the launch queue
    return 1 if device.type == "cpu" else 8


@torch.no_grad()  # not inference_mode: its tensors break the next FSDP training step (DESIGN.md §4)
def generate(model: Transformer, prompts: list[list[int]], cfg: SamplingConfig, keys: list[list[int]] | None = None,
             stop_ids: list[int] = (), n: int = 1, return_logps: bool = False,
             progress: bool = False, stats: dict | None = None) -> list[list[Completion]]:
    """n completions for each prompt (token ids), as [prompt][sample]; keys[i][j] seeds job (i, j)'s stream.
    `stats`, when given, receives the pass's KV-cache figures (_Engine.kv_stats)."""
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} has no tokens")
    if keys is None:
        keys = [[stream_key(0, "", str(i), j) for j in range(n)] for i in range(len(prompts))]
    if not prompts or n == 0:
        return [[] for _ in prompts]
    engine = _Engine(model, prompts, n, cfg, keys, stop_ids, return_logps)
    out = engine.run(progress)
    if stats is not None:
        stats.update(engine.kv_stats())
    return out


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
           progress: bool = False, source="the prompt rows") -> list[dict]:
    """samples.jsonl rows, in input order, for prompt rows {"prompt_id", "prompt"} (this process only).

    `stream` names the use ("iter1/policy", "iter1/d_ms/ckpt-50", ...) so independent passes draw
    independent randomness; the same (seed, stream, prompt id, sample index) always gives the same response.
    With return_logps the rows also carry "token_ids" and "logps" (untempered) per response.
    A prompt over cfg.max_prompt_tokens is a UserError naming it in `source` (the prompt file).
    """
    ids = [chat.encode_within(tok, p, cfg.max_prompt_tokens, source) for p in prompts]
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
                   return_logps: bool = False, progress: bool = True, source="the prompt rows") -> dict:
    """Data-parallel sampling to one samples.jsonl: rank r takes prompts[r::world] and writes its shard,
    rank 0 merges the shards in input order (atomically). Returns the global summary on every rank.
    `source`: where the prompts came from, for the error that names an over-long one."""
    d = dist.get()
    out = Path(out)
    t0 = time.perf_counter()
    rows = sample(model, tok, dist.shard(prompts), cfg, seed, stream, n, stop_ids, return_logps,
                  progress and d.is_main, source)
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
    model: str = ""  # (required) causal-LM directory (weights + tokenizer) or Hub id (org/name)
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
    a = hub.resolve_flags(parse_args(argv), "model")  # a Hub id -> its cached snapshot
    d = dist.init_distributed(None if a.device == "auto" else a.device)
    prompts = read_prompts(a.prompts)
    tok = chat.load_tokenizer(a.model)
    model = checkpoint.load_model(a.model, dtype=a.dtype, device=d.device).eval()
    s = sample_to_file(model, tok, prompts, a.sampling, a.out, seed=a.seed, stream=a.stream,
                       n=a.num_samples or a.n, stop_ids=chat.stop_ids(tok, a.model), return_logps=a.logps,
                       source=a.prompts)
    dist.print0(summary_line(s) + f" -> {a.out}")
    return s


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
