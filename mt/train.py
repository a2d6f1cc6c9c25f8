"""The one training loop for the policy (DPO family, E-step Eq. 4), the reward model (Bradley-Terry,
M-step Eq. 5) and plain SFT (next-token NLL on responses, for building a base policy).

    train(model, examples, "dpo" | "rm" | "sft", cfg, out_dir, ref_logps=...)

- FSDP2 (`fully_shard` per block, then the root) when world > 1, on GPU, or for bf16; bf16 compute with
  fp32 master weights on GPU, plain fp32 on CPU; optional activation checkpointing.
- `load_for_training(dir, cfg)` reads the weights on rank 0 only and broadcasts each rank its shards
  (torchtitan-style meta-device init), so 8 ranks do not hold 8 full copies in host memory.
- Global batch = micro × accumulation × world. Every loss is summed per example and divided by the
  GLOBAL count of the step (pairs, or response tokens for SFT), known on the host before the step, so
  accumulation and world size do not change the result (DESIGN.md §4).
- Data order is a function of (seed, epoch) only, never of the world size.
- Chosen and rejected rows go through the model in one concatenated forward; the reference log-probs
  are computed once before training (`reference_logps`) and stored, so no second model is held.
- A non-finite loss or gradient norm on any rank stops every rank before the optimizer step.
- Checkpoints `ckpt-{step}` (model selection's candidates) and `final` are Hugging Face directories;
  `trainer_state/` (model + optimizer, sharded, torch.distributed.checkpoint) lets an interrupted
  stage resume at its last checkpoint and finish with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import base64
from array import array
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from mt import dist
from mt.checkpoint import (CheckpointError, load_model, read_config, read_weights, replace_dir, resolve_dtype,
                           save_model)
from mt.config import DPOConfig, RMConfig, TrainConfig
from mt.losses import AVERAGE_LOGPS, USES_REFERENCE, bradley_terry_loss, preference_loss, sequence_logps
from mt.model import Transformer

OBJECTIVES = ("dpo", "rm", "sft")


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient norm; raised on every rank before the optimizer step."""


class TrainError(ValueError):
    """A training input we cannot use; the message names the file or field and what to change."""


# ---- examples: token ids made once, with the policy's or the RM's own tokenizer


@dataclass(frozen=True)
class Example:
    """One training item. Sequences are prompt + response ids; `*_start` is the first response index.

    Pairs (dpo, rm) fill chosen and rejected; sft uses `chosen` only. The RM reads its score at the last
    token, so its `*_start` is unused.
    """
    key: str  # pair id: the key of ref_logps.jsonl
    prompt_id: str
    chosen: tuple[int, ...]
    chosen_start: int
    rejected: tuple[int, ...] = ()
    rejected_start: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def pair_id(prompt_id: str, chosen: str, rejected: str) -> str:
    """A stable id for a pair (a prompt may have several pairs; read_pairs forbids exact duplicates)."""
    return hashlib.sha256(json.dumps([prompt_id, chosen, rejected]).encode()).hexdigest()[:16]


def policy_examples(tok, pairs, max_length: int) -> tuple[list[Example], int]:
    """DPO examples: prompt (chat template, once) + response + end-of-turn; pairs over max_length are dropped.

    Returns (examples, n_dropped). Prompt and response are tokenized apart, as the sampler produced them.
    """
    from mt.chat import encode_prompt, encode_response
    out, dropped = [], 0
    for p in pairs:
        x = encode_prompt(tok, p.prompt)
        yc, yr = encode_response(tok, p.chosen), encode_response(tok, p.rejected)
        if len(x) + max(len(yc), len(yr)) > max_length:
            dropped += 1  # never truncated: a cut response would teach the wrong ending
            continue
        out.append(Example(pair_id(p.prompt_id, p.chosen, p.rejected), p.prompt_id, tuple(x + yc), len(x),
                           tuple(x + yr), len(x)))
    return out, dropped


def rm_examples(tok, pairs, max_length: int) -> tuple[list[Example], int]:
    """Bradley-Terry examples: each whole chat rendered by the RM's own template; over-long pairs dropped."""
    from mt.chat import encode_conversation
    out, dropped = [], 0
    for p in pairs:
        c, r = encode_conversation(tok, p.prompt, p.chosen), encode_conversation(tok, p.prompt, p.rejected)
        if max(len(c), len(r)) > max_length:
            dropped += 1
            continue
        out.append(Example(pair_id(p.prompt_id, p.chosen, p.rejected), p.prompt_id, tuple(c), 0, tuple(r), 0))
    return out, dropped


def sft_examples(tok, items, max_length: int) -> tuple[list[Example], int]:
    """SFT examples from (prompt_id, messages, response) triples; the loss covers the response tokens only."""
    from mt.chat import encode_prompt, encode_response
    out, dropped = [], 0
    for prompt_id, messages, response in items:
        x, y = encode_prompt(tok, messages), encode_response(tok, response)
        if len(x) + len(y) > max_length:
            dropped += 1
            continue
        out.append(Example(pair_id(prompt_id, response, ""), prompt_id, tuple(x + y), len(x)))
    return out, dropped


# ---- batches


@dataclass
class Batch:
    ids: torch.Tensor  # (N, T): chosen rows then rejected rows (N = 2b), or b rows for sft
    lengths: torch.Tensor  # (N,)
    loss_mask: torch.Tensor  # (N, T) True on response tokens
    attention_mask: torch.Tensor | None  # (N, T) for left padding only; right padding needs none
    ref_chosen: torch.Tensor | None = None  # (b,) summed reference log-probs
    ref_rejected: torch.Tensor | None = None


def collate(examples: list[Example], pairwise: bool, pad_id: int = 0, device="cpu", side: str = "right",
            refs: dict[str, tuple[float, float]] | None = None) -> Batch:
    """Pad chosen rows then rejected rows into one batch: one forward for both (concatenated forward)."""
    seqs = [(e.chosen, e.chosen_start) for e in examples]
    if pairwise:
        seqs += [(e.rejected, e.rejected_start) for e in examples]
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, start) in enumerate(seqs):
        off = 0 if side == "right" else T - len(s)
        ids[i, off:off + len(s)] = torch.tensor(s, dtype=torch.long)
        loss_mask[i, off + start:off + len(s)] = True
    lengths = torch.tensor([len(s) for s, _ in seqs])
    am = None
    if side == "left":
        am = (torch.arange(T)[None] >= T - lengths[:, None]).to(device)
    rc = rr = None
    if refs is not None:
        rc = torch.tensor([refs[e.key][0] for e in examples], dtype=torch.float32, device=device)
        rr = torch.tensor([refs[e.key][1] for e in examples], dtype=torch.float32, device=device)
    return Batch(ids.to(device), lengths.to(device), loss_mask.to(device), am, rc, rr)


def global_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step: a fresh permutation per epoch, seeded by (seed, epoch).

    Independent of world size and micro-batching; an epoch's last batch may be smaller (kept, not dropped).
    """
    out = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        out += [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return out


def rank_micro_batches(batch: list[int], num_tokens: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's share of a global batch, split into the SAME number of micro-batches on every rank.

    FSDP runs collectives in every forward, so ranks must agree on the count; a rank may get an empty
    micro-batch in a short last batch (the loop then runs a zero-weight forward). Lengths are sorted
    within the share so a micro-batch pads little.
    """
    share = sorted(batch[rank::world], key=lambda i: -num_tokens[i])
    k = math.ceil(math.ceil(len(batch) / world) / micro)
    q, r = divmod(len(share), k)
    sizes = [q + (j < r) for j in range(k)]
    starts = [sum(sizes[:j]) for j in range(k)]
    return [share[s:s + n] for s, n in zip(starts, sizes)]


def lr_at(step: int, total: int, lr: float, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup over ceil(warmup_ratio · total) steps, then cosine decay to min_lr_ratio · lr (0-based step)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- objectives: (model, batch, cfg) -> per-example loss (b,), per-example metrics


def dpo_objective(model, batch: Batch, cfg: DPOConfig):
    """Eq. 4 (and cDPO / IPO / hinge / SimPO by cfg.loss) from one forward over chosen + rejected."""
    logits = model(batch.ids, attention_mask=batch.attention_mask)  # (2b, T, V)
    logps = sequence_logps(logits, batch.ids, batch.loss_mask, average=AVERAGE_LOGPS[cfg.loss])  # (2b,) fp32
    b = batch.ids.shape[0] // 2
    return preference_loss(cfg.loss, logps[:b], logps[b:], batch.ref_chosen, batch.ref_rejected, beta=cfg.beta,
                           label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma)


def rm_objective(model, batch: Batch, cfg: RMConfig):
    """Eq. 5: Bradley-Terry on the scores at each sequence's last real token (read by length, not pad id)."""
    r = model.rewards(batch.ids, attention_mask=batch.attention_mask, lengths=batch.lengths).float()  # (2b,)
    b = batch.ids.shape[0] // 2
    return bradley_terry_loss(r[:b], r[b:], cfg.margin)


def sft_objective(model, batch: Batch, cfg: TrainConfig):
    """Next-token NLL summed over each row's response tokens; the loop divides by the global token count."""
    logits = model(batch.ids, attention_mask=batch.attention_mask)  # (b, T, V)
    return -sequence_logps(logits, batch.ids, batch.loss_mask), {}


OBJECTIVE_FNS = {"dpo": dpo_objective, "rm": rm_objective, "sft": sft_objective}


def loss_units(objective: str, e: Example) -> int:
    """What the loss is averaged over: pairs, or response tokens for SFT (whose targets are tokens)."""
    return len(e.chosen) - max(e.chosen_start, 1) if objective == "sft" else 1  # token 0 is never a target


# ---- model preparation: FSDP2, mixed precision, activation checkpointing, loading on rank 0


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    return resolve_dtype(cfg.dtype, device)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def uses_fsdp(cfg: TrainConfig, device: torch.device, fsdp: bool | None = None) -> bool:
    """FSDP when asked, else whenever world > 1, on GPU, or for bf16 (mixed precision is FSDP's policy)."""
    if fsdp is not None:
        return fsdp
    return dist.get().world_size > 1 or device.type == "cuda" or compute_dtype(cfg, device) != torch.float32


def prepare_model(model, cfg: TrainConfig, device=None, fsdp: bool | None = None):
    """fp32 master weights on `device`; FSDP2 per block then the root (bf16 params, fp32 reductions on
    GPU); activation checkpointing per block. Returns the same module, wrapped in place; idempotent.

    A model on the meta device (see load_for_training) is sharded first, then only this rank's shards
    are allocated, empty: the caller loads the weights."""
    if is_sharded(model):
        return model
    d = dist.get()
    device = torch.device(device or d.device)
    dtype = compute_dtype(cfg, device)
    fsdp = uses_fsdp(cfg, device, fsdp)
    if dtype != torch.float32 and not fsdp:
        raise TrainError(f"dtype {dtype} needs FSDP's mixed precision (fsdp=True)")
    if d.world_size > 1 and not fsdp:
        raise TrainError(f"world size {d.world_size} needs FSDP (fsdp=True): nothing else syncs the gradients")
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and not fsdp:
        raise TrainError("a model on the meta device has no weights: load it with load_model (or use FSDP)")
    model.float()  # master weights stay fp32; FSDP casts a bf16 copy for compute
    if cfg.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint
        for block in model.model.layers:
            # overriding forward (not wrapping the module) keeps Hugging Face parameter names
            block.forward = (lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k))
    if not fsdp:
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dist.ensure_process_group(device)
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # embeddings, final norm, head; moves shards to the device
    if on_meta:
        # allocate this rank's shards only (uninitialised); Transformer._apply rebuilds the fp32 rope buffer
        model.to_empty(device=device)
    return model


def load_for_training(path, cfg: TrainConfig, head: str | None = None, device=None,
                      fsdp: bool | None = None):
    """The Hugging Face model at `path`, prepared for train(). Under FSDP only rank 0 reads the weights:
    every rank shards an empty (meta-device) model, then receives its shards from rank 0, so the host holds
    one copy of the weights in their stored dtype, not one per rank nor an fp32 one. Without FSDP it is
    prepare_model(load_model(path))."""
    d = dist.get()
    device = torch.device(device or d.device)
    if not uses_fsdp(cfg, device, fsdp):
        return prepare_model(load_model(path, torch.float32, "cpu", head=head), cfg, device, fsdp=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    with torch.device("meta"):
        model = Transformer(read_config(path, head=head))  # config.json only: cheap on every rank
    model.tie_weights()  # one shared parameter, so FSDP shards (and the optimizer updates) it once
    prepare_model(model, cfg, device, fsdp=True)
    full, err = {}, None
    if d.is_main:
        try:
            # as stored (bf16 stays bf16: half an fp32 copy), with load_model's checks; a fresh score head is
            # drawn from rank 0's RNG and broadcast, so every rank starts from the same head whatever its seed
            _, full = read_weights(path, head=head)
            if model.cfg.head == "lm" and model.cfg.tie_word_embeddings:
                full["lm_head.weight"] = full["model.embed_tokens.weight"]  # one parameter under both names
        except Exception as e:
            err = e
    # a bad directory must stop every rank, not leave ranks 1.. waiting in the broadcast
    msg = dist.broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if msg is not None:
        raise CheckpointError(f"{path}: rank 0 could not load the weights: {msg}")
    # one tensor at a time from rank 0, in its stored dtype; each rank casts its own shard into the fp32
    # master weights (DCP's full-state-dict path copies into the existing shards)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---- reference log-probs (computed once, before training, with the frozen π_{t-1})


@torch.no_grad()
def reference_logps(model, examples: list[Example], micro_batch_size: int, pad_id: int = 0,
                    progress: bool = True) -> dict[str, tuple[float, float]]:
    """Summed log-probs of chosen and rejected responses under `model`, data-parallel: {pair id: (c, r)}.

    no_grad, not inference_mode: inference tensors would break the FSDP training forward that follows.
    """
    from tqdm import tqdm
    d = dist.get()
    dev = model_device(model)
    order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
    share = order[d.rank::d.world_size]
    k = math.ceil(math.ceil(len(order) / d.world_size) / micro_batch_size)  # equal forwards on every rank
    local = []
    for j in tqdm(range(k), desc="reference log-probs", disable=not (progress and d.is_main), dynamic_ncols=True):
        idx = share[j * micro_batch_size:(j + 1) * micro_batch_size]
        batch = collate([examples[i] for i in (idx or order[:1])], True, pad_id, dev)
        logits = model(batch.ids)  # (2b, T, V)
        lp = sequence_logps(logits, batch.ids, batch.loss_mask)  # (2b,)
        if idx:
            local.append((idx, lp.view(2, -1).T))
    rows = [(i, *v) for idx, lp in local for i, v in zip(idx, lp.tolist())]  # host sync once, at the end
    out = {}
    for part in dist.gather_objects(rows):
        for i, c, r in part:
            out[examples[i].key] = (c, r)
    return out


def write_ref_logps(path, examples: list[Example], refs: dict[str, tuple[float, float]], ref_dir: str = ""):
    from mt.data import write_jsonl
    write_jsonl(path, ({"pair_id": e.key, "prompt_id": e.prompt_id, "ref_chosen_logps": refs[e.key][0],
                        "ref_rejected_logps": refs[e.key][1], "ref": str(ref_dir)} for e in examples))


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
                refs[row["pair_id"]] = (float(row["ref_chosen_logps"]), float(row["ref_rejected_logps"]))
            except (ValueError, KeyError, TypeError) as e:
                raise TrainError(f"{path}:{n}: bad reference log-prob row ({type(e).__name__}: {e}). "
                                 "Fix: delete the file so it is recomputed") from None
    for e in examples or []:
        if e.key not in refs:
            raise TrainError(f"{path}: no reference log-probs for pair {e.key} (prompt_id {e.prompt_id!r}); the "
                             "file was made for other pairs. Fix: delete it so it is recomputed")
    return refs


# ---- checkpoints and resumable trainer state


def full_state_dict(model) -> dict:
    """The whole model's weights on rank 0's CPU (empty elsewhere); a collective under FSDP."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.get().is_main else {}


def save_hf(model, path, save_dtype: torch.dtype, tokenizer_dir=None, generation_config=None):
    """Gather the weights to rank 0 and write a Hugging Face directory (atomic: temp dir, then rename)."""
    sd = full_state_dict(model)
    if dist.get().is_main:
        save_model({k: v.to(save_dtype) for k, v in sd.items()}, path, cfg=model.cfg, tokenizer_dir=tokenizer_dir,
                   generation_config=generation_config)
    dist.barrier()


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def save_trainer_state(model, optimizer, out_dir: Path, meta: dict):
    """Model + optimizer (sharded, each rank writes its part), then meta.json; swapped in atomically."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = out_dir / f".trainer_state.tmp-{meta['step']}"
    if dist.get().is_main and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    with _quiet_dcp():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get().is_main:
        _write_json_fsync(tmp / "meta.json", meta)
        replace_dir(tmp, out_dir / "trainer_state")
    dist.barrier()


def mark_done(out_dir: Path, meta: dict):
    """After `final` is written: keep only meta.json (optimizer state is no longer needed)."""
    if dist.get().is_main:
        tmp = out_dir / ".trainer_state.tmp-done"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_json_fsync(tmp / "meta.json", meta)
        replace_dir(tmp, out_dir / "trainer_state")
    dist.barrier()


def load_trainer_state(model, optimizer, out_dir: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    with _quiet_dcp():
        dcp.load(sd, checkpoint_id=str(out_dir / "trainer_state"))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


@contextlib.contextmanager
def _quiet_dcp():
    """One process without a process group is a supported DCP mode; its warning says nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_json_fsync(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def fingerprint(objective: str, cfg: TrainConfig, examples: list[Example]) -> str:
    """What the weights depend on: objective, hyperparameters, the tokenized data (not micro-batching)."""
    h = hashlib.sha256()
    skip = {"micro_batch_size", "activation_checkpointing", "save_every"}
    h.update(json.dumps([objective, {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}],
                        default=str).encode())
    for e in examples:
        h.update(json.dumps([e.key, e.chosen_start, e.rejected_start]).encode())
        h.update(array("l", e.chosen + (-1,) + e.rejected).tobytes())
    return h.hexdigest()[:16]


# ---- the loop


@dataclass
class TrainResult:
    out_dir: Path
    final: Path
    checkpoints: list[Path]  # ckpt-{step}, in step order (final not included)
    steps: int
    last: dict  # the last metrics row
    resumed_from: int = 0  # 0 = from scratch


def train(model, examples: list[Example], objective: str, cfg: TrainConfig, out_dir, *,
          ref_logps: dict[str, tuple[float, float]] | None = None, pad_id: int = 0, tokenizer_dir=None,
          generation_config: dict | None = None, save_dtype: torch.dtype | None = None, fsdp: bool | None = None,
          final_dir=None, progress: bool = True, desc: str | None = None) -> TrainResult:
    """Train `model` in place on `examples`; write ckpt-{step}/, final/, metrics.jsonl under out_dir.

    `final_dir` (default out_dir/final) may be out_dir itself: the model files then sit beside
    metrics.jsonl, so out_dir is the Hugging Face directory (what the M-step's `rm/` is).
    Reruns resume from out_dir/trainer_state (same data and hyperparameters required) and end with the
    same weights as an uninterrupted run; a finished run returns at once.
    """
    from tqdm import tqdm
    if objective not in OBJECTIVES:
        raise TrainError(f"objective={objective!r}: must be one of {', '.join(OBJECTIVES)}")
    if not examples:
        raise TrainError(f"no training examples for {objective} (all dropped by max_length={cfg.max_length}?)")
    d = dist.get()
    out_dir = Path(out_dir)
    final = Path(final_dir) if final_dir is not None else out_dir / "final"
    world = d.world_size
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise TrainError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size "
                         f"({cfg.micro_batch_size}) × world size ({world}): global batch = micro × accumulation × world")
    pairwise = objective != "sft"
    uses_ref = objective == "dpo" and USES_REFERENCE[cfg.loss]
    if uses_ref:
        if ref_logps is None:
            raise TrainError(f"loss={cfg.loss!r} needs reference log-probs: pass ref_logps (see reference_logps)")
        missing = [e.key for e in examples if e.key not in ref_logps]
        if missing:
            raise TrainError(f"{len(missing)} pairs have no reference log-prob (e.g. {missing[0]})")
    fn = OBJECTIVE_FNS[objective]
    model = prepare_model(model, cfg, fsdp=fsdp)
    dev = model_device(model)
    save_dtype = save_dtype or compute_dtype(cfg, dev)
    batches = global_batches(len(examples), cfg.batch_size, cfg.epochs, cfg.seed)
    total = len(batches)
    steps_per_epoch = total // cfg.epochs
    num_tokens = [e.num_tokens for e in examples]
    units = [loss_units(objective, e) for e in examples]
    fp = fingerprint(objective, cfg, examples)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms and biases: no weight decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=tuple(cfg.adam_betas), foreach=True)
    torch.manual_seed(cfg.seed)  # nothing in the loop draws random numbers today; a fork adding dropout would

    # ---- resume
    start, elapsed0 = 0, 0.0
    meta_path = out_dir / "trainer_state" / "meta.json"
    checkpoints = []
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["fingerprint"] != fp:
            raise TrainError(f"{out_dir}/trainer_state belongs to another run (different data or hyperparameters). "
                             f"Fix: use a new output directory, or delete {out_dir}/trainer_state to start over")
        checkpoints = [out_dir / c for c in meta.get("checkpoints", [])]
        if meta.get("done") and (final / "config.json").is_file():
            dist.print0(f"{out_dir}: already trained ({total} steps); nothing to do")
            return TrainResult(out_dir, final, checkpoints, total, meta.get("last", {}), total)
        if not meta.get("done"):
            load_trainer_state(model, optimizer, out_dir)
            torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8))
            start, elapsed0 = meta["step"], meta["elapsed"]
            dist.print0(f"{out_dir}: resuming at step {start}/{total}")
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for tmp in [*out_dir.glob(".*.tmp-*"), out_dir / ".final-staging"]:  # partial writes of a killed run
            shutil.rmtree(tmp, ignore_errors=True)
        if (out_dir / "metrics.jsonl").exists():  # drop rows of steps that will be redone
            from mt.data import write_jsonl
            rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            write_jsonl(out_dir / "metrics.jsonl", [r for r in rows if r["step"] <= start])
    dist.barrier()

    def state_meta(step, done=False, last=None):
        return {"step": step, "total": total, "fingerprint": fp, "rng": _rng_state(), "done": done,
                "elapsed": elapsed0 + time.perf_counter() - t0, "objective": objective,
                "checkpoints": [c.name for c in checkpoints], "last": last or {}}

    # ---- steps
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=desc or f"train {objective}", disable=not (progress and d.is_main),
               dynamic_ncols=True)
    metrics_file = open(out_dir / "metrics.jsonl", "a") if d.is_main else None
    model.train()
    row = {}
    for step in range(start, total):
        batch_idx = batches[step]
        denom = sum(units[i] for i in batch_idx)  # global count, known on the host: no communication
        micro = rank_micro_batches(batch_idx, num_tokens, d.rank, world, cfg.micro_batch_size)
        sums: dict[str, torch.Tensor] = {}
        local_losses = []
        for idx in micro:
            batch = collate([examples[i] for i in (idx or batch_idx[:1])], pairwise, pad_id, dev,
                            refs=ref_logps if uses_ref else None)
            loss_vec, metrics = fn(model, batch, cfg)  # (b,), {name: (b,)}
            # FSDP averages gradients over ranks; × world turns that back into the global sum / denom
            real = 1.0 if idx else 0.0  # an empty share runs a zero-weight forward (FSDP collectives)
            (loss_vec.sum() * (real * world / denom)).backward()
            if idx:
                local_losses.append(loss_vec.detach().sum())
            for k, v in {"loss": loss_vec.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0) + v.float().sum() * real
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        names = sorted(sums)  # the same on every rank: empty micro-batches report zero-weighted metrics
        local = torch.stack([sums[k] for k in names])
        bad = (~torch.isfinite(local).all() | ~torch.isfinite(grad_norm)).float()
        stats = dist.all_reduce_sum(torch.cat([local, bad[None], grad_norm[None].float()]))
        # the one host sync per optimizer step: the non-finite check must happen before the update
        vals = stats.tolist()
        if vals[len(names)] > 0:
            _fail(step, total, batch_idx, micro, local_losses, examples, grad_norm, out_dir, checkpoints)
        lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log (rank 0)
        n_pairs = len(batch_idx)
        means = {k: v / (denom if k == "loss" else n_pairs) for k, v in zip(names, vals)}
        row = {"step": step + 1, "epoch": step // steps_per_epoch, "loss": means.pop("loss"),
               "lr": lr, "grad_norm": grad_norm_value(vals[-1], world)}
        if "correct" in means:
            row["accuracy"] = means.pop("correct")
        row.update(means)
        row.update(examples=n_pairs, tokens=sum(num_tokens[i] for i in batch_idx),
                   elapsed=round(elapsed0 + time.perf_counter() - t0, 3))
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", **({"acc": f"{row['accuracy']:.2f}"} if "accuracy" in row else {}))

        # ---- checkpoints: HF directory first, then the resume state that points past it
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            ckpt = out_dir / f"ckpt-{step + 1}"
            save_hf(model, ckpt, save_dtype, tokenizer_dir, generation_config)
            if ckpt not in checkpoints:
                checkpoints.append(ckpt)
            save_trainer_state(model, optimizer, out_dir, state_meta(step + 1, last=row))
    bar.close()
    if metrics_file:
        metrics_file.close()
    if final.resolve() == out_dir.resolve():
        # the HF files go beside metrics.jsonl: each written to a staging dir, then renamed into place
        # (the stage is not done until trainer_state says so, below)
        stage = out_dir / ".final-staging"
        save_hf(model, stage, save_dtype, tokenizer_dir, generation_config)
        if d.is_main:
            for f in stage.iterdir():
                os.replace(f, out_dir / f.name)
            stage.rmdir()
        dist.barrier()
    else:
        save_hf(model, final, save_dtype, tokenizer_dir, generation_config)
    mark_done(out_dir, state_meta(total, done=True, last=row))
    summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k in ("loss", "accuracy", "margin"))
    dist.print0(f"{objective}: {total} steps on {len(examples)} examples in {time.perf_counter() - t0:.1f}s; "
                f"last step {summary}; saved {final}")
    return TrainResult(out_dir, final, checkpoints, total, row, start)


def metrics_summary(out_dir) -> dict:
    """From a stage's metrics.jsonl: steps, last and first loss, and the mean accuracy over the last
    epoch's steps (each measured on its batch before that batch's update: online, not memorised)."""
    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if not rows:
        return {}
    last = [r for r in rows if r["epoch"] == rows[-1]["epoch"]]
    out = {"steps": rows[-1]["step"], "loss": rows[-1]["loss"], "first_loss": rows[0]["loss"]}
    if "accuracy" in rows[-1]:
        out["accuracy"] = sum(r["accuracy"] for r in last) / len(last)
        out["margin"] = rows[-1]["margin"]
    return out


def grad_norm_value(summed: float, world: int) -> float:
    return summed / world  # every rank contributed the same (global) norm to the sum


def _fail(step, total, batch_idx, micro, local_losses, examples, grad_norm, out_dir, checkpoints):
    """Every rank arrives here together (the flag was all-reduced); say where the non-finite value came from."""
    d = dist.get()
    bad = []
    for j, (idx, loss) in enumerate(zip([m for m in micro if m], local_losses)):
        if not math.isfinite(loss.item()):
            bad.append(f"rank {d.rank} micro-batch {j}: loss {loss.item()} on prompt_ids "
                       f"{[examples[i].prompt_id for i in idx]}")
    parts = [b for part in dist.gather_objects(bad) for b in part]
    last = checkpoints[-1] if checkpoints else None
    raise NonFiniteError(
        f"step {step + 1}/{total} (global batch of {len(batch_idx)} examples): non-finite "
        f"{'loss' if parts else 'gradient norm'} (grad norm {float(grad_norm)}); "
        + ("; ".join(parts) if parts else "all losses finite")
        + f". Stopped on every rank before the optimizer step; the last checkpoint "
        f"({last or 'none yet'}) and {out_dir}/trainer_state are untouched. "
        "Fix: lower the learning rate or inspect those pairs")
