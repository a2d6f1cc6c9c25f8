"""The one training loop: the policy (DPO family, E-step Eq. 4), the reward model (Bradley-Terry,
M-step Eq. 5) and plain SFT (building the sandbox's base policy).

    train(model, examples, preference_objective("dpo") | BRADLEY_TERRY | SFT, cfg, out_dir,
          ref_logps=...)

- What differs between the three is a small value, `mt.losses.Objective` (its step function,
  whether rows come in chosen/rejected pairs, whether the loss is per token);
  the loop never tests a name.
- FSDP2 and mixed precision are mt/dist.py's `prepare_model`; loading on rank 0 and saving Hugging
  Face directories are mt/checkpoint.py's; tokenising examples is mt/chat.py's.
- Micro-batches are packed (mt/packing.py: rows of whole examples, formed by a token budget, the
  prompt once per pair) unless `--dpo.packing false` (`--rm_train.*`), which pads rows (`collate`,
  the reference layout); the objective's step reads either through the batch.
- Global batch = micro × accumulation × world. Every loss is summed per example and divided by the
  GLOBAL count of the step (pairs, or response tokens for SFT), known on the host before the step,
  so accumulation and world size do not change the result (DESIGN.md §4).
- Data order is a function of (seed, epoch) only, never of the world size.
- A non-finite loss or gradient norm on any rank stops every rank before the optimizer step.
- Checkpoints `ckpt-{step}` (model selection's candidates) and `final` are Hugging Face
  directories; `trainer_state/` (each rank's shards of the model and of AdamW's state as
  safetensors, the rest JSON: nothing is ever unpickled) lets an interrupted stage resume at its
  last checkpoint and finish with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from mt import dist, track
from mt.chat import Example
from mt.checkpoint import recover_replaced, replace_dir, save_hf, save_tensors
from mt.config import TrainConfig
from mt.data import pad_sequences, read_json, read_jsonl_rows, write_json, write_jsonl
from mt.errors import UserError
from mt.logps import response_logps
from mt.losses import Objective
from mt.packing import Packing
from mt.progress import progress as progress_bar


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient norm; raised on every rank before the optimizer step."""


class TrainError(UserError):
    """A training input we cannot use; the message names the file or field and what to change."""


@dataclass
class TrainResult:
    out_dir: Path
    final: Path
    checkpoints: list[Path]  # ckpt-{step}, in step order (final not included)
    steps: int
    last: dict  # the last metrics row
    resumed_from: int = 0  # 0 = from scratch


# ---- the loop


def train(model, examples: list[Example], objective: Objective, cfg: TrainConfig, out_dir, *,
          ref_logps: dict[str, tuple[float, float]] | None = None, pad_id: int = 0,
          tokenizer_dir=None, generation_config: dict | None = None,
          save_dtype: torch.dtype | None = None, fsdp: bool | None = None, progress: bool = True,
          desc: str | None = None) -> TrainResult:
    """Train `model` in place on `examples`; write ckpt-{step}/, final/,
    metrics.jsonl under out_dir.

    Reruns resume from out_dir/trainer_state (same data and hyperparameters required) and end with
    the same weights as an uninterrupted run; a finished run returns at once.
    """
    # ---- setup
    check_inputs(examples, objective, cfg, ref_logps)
    d, out_dir = dist.get(), Path(out_dir)
    final, world = out_dir / "final", d.world_size
    model = dist.prepare_model(model, cfg, fsdp=fsdp)
    dev = dist.model_device(model)
    save_dtype = save_dtype or dist.resolve_dtype(cfg.dtype, dev)
    batches = global_batches(len(examples), cfg.batch_size, cfg.epochs, cfg.seed)
    total = len(batches)
    num_tokens = [e.num_tokens for e in examples]
    units = [loss_units(objective, e) for e in examples]
    refs = ref_logps if objective.uses_reference else None
    layout = (Packing(examples, objective.pairwise, cfg.share_prompt, cfg.micro_batch_size,
                      cfg.micro_batch_tokens, pad_id, dev, refs) if cfg.packing
              else Padded(examples, objective.pairwise, cfg.micro_batch_size, pad_id, dev, refs))
    optimizer = make_optimizer(model, cfg)
    # nothing in the loop draws random numbers today; a fork adding dropout would
    torch.manual_seed(cfg.seed)
    state = TrainerState(out_dir, fingerprint(objective, cfg, examples), total, objective.name)

    # ---- resume
    if state.done() and (final / "config.json").is_file():
        dist.print0(f"{out_dir}: already trained ({total} steps); nothing to do")
        return TrainResult(out_dir, final, state.checkpoints, total, state.last, total)
    start = state.resume(model, optimizer)

    # ---- steps
    bar = progress_bar(total, desc or f"train {objective.name}", progress and d.is_main,
                       initial=start, unit="step")
    metrics_file = open(out_dir / "metrics.jsonl", "a") if d.is_main else None
    model.train()
    row = {}
    for step in range(start, total):
        t_step = time.perf_counter()
        batch_idx = batches[step]
        # global count, known on the host: no communication
        denom = sum(units[i] for i in batch_idx)
        micro = layout.micro(batch_idx, d.rank, world)
        sums: dict[str, torch.Tensor] = {}
        local_losses = []
        for idx in micro:
            batch = layout.batch([examples[i] for i in (idx or batch_idx[:1])])
            loss_vec, metrics = objective.step(model, batch, cfg)  # (b,), {name: (b,)}
            # FSDP averages gradients over ranks;
            # × world turns that back into the global sum / denom
            # an empty share runs a zero-weight forward (FSDP collectives)
            real = 1.0 if idx else 0.0
            (loss_vec.sum() * (real * world / denom)).backward()
            if idx:
                local_losses.append(loss_vec.detach().sum())
            for k, v in {"loss": loss_vec.detach(), **metrics}.items():
                v = v.to(torch.promote_types(v.dtype, torch.float32))  # fp64 stays fp64
                sums[k] = sums.get(k, 0) + v.sum() * real
            # positions computed and the padding among them (log_row's pad_fraction)
            sums[SLOTS] = sums.get(SLOTS, 0) + batch.slots * real
            sums[PADS] = sums.get(PADS, 0) + (batch.slots - batch.tokens) * real
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # the same on every rank: empty micro-batches report zero-weighted metrics
        names = sorted(sums)
        local = torch.stack([torch.as_tensor(sums[k], dtype=sums["loss"].dtype, device=dev)
                             for k in names])
        bad = (~torch.isfinite(local).all() | ~torch.isfinite(grad_norm)).to(local.dtype)
        stats = dist.all_reduce_sum(torch.cat([local, bad[None], grad_norm[None].to(local.dtype)]))
        # the one host sync per optimizer step: the non-finite check must happen before the update
        vals = stats.tolist()
        if vals[len(names)] > 0:
            _fail(step, total, batch_idx, micro, local_losses, examples, grad_norm, out_dir,
                  state.checkpoints)
        lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log (rank 0)
        row = log_row(step, total // cfg.epochs, names, vals, denom, lr, world, batch_idx,
                      num_tokens, state.elapsed(), time.perf_counter() - t_step, dev)
        # the one file appended in place: flushed and fsynced like every other write
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            os.fsync(metrics_file.fileno())
            track.log_step(out_dir, row)  # --log.tensorboard / --log.wandb: the same row
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}",
                        **({"acc": f"{row['accuracy']:.2f}"} if "accuracy" in row else {}))

        # ---- checkpoints: HF directory first, then the resume state that points past it
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            ckpt = out_dir / f"ckpt-{step + 1}"
            save_hf(model, ckpt, save_dtype, tokenizer_dir, generation_config)
            if ckpt not in state.checkpoints:
                state.checkpoints.append(ckpt)
            state.save(model, optimizer, step + 1, row)
    bar.close()
    if metrics_file:
        metrics_file.close()
        track.flush()
    save_hf(model, final, save_dtype, tokenizer_dir, generation_config)
    state.mark_done(row)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                        if k in ("loss", "accuracy", "margin"))
    dist.print0(f"{objective.name}: {total} steps on {len(examples)} examples in "
                f"{state.elapsed(run=True):.1f}s; last step {summary}; saved {final}")
    return TrainResult(out_dir, final, state.checkpoints, total, row, start)


def check_inputs(examples, objective, cfg, ref_logps):
    """The training inputs we cannot use, named before any compute."""
    if not isinstance(objective, Objective):
        raise TrainError(f"objective={objective!r}: must be an mt.losses.Objective "
                         "(preference_objective(loss), BRADLEY_TERRY or SFT)")
    if not examples:
        raise TrainError(f"no training examples for {objective.name} (all dropped by "
                         f"max_length={cfg.max_length}?)")
    world = dist.get().world_size
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise TrainError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size "
                         f"({cfg.micro_batch_size}) × world size ({world}): global batch = micro "
                         "× accumulation × world. Fix: change --dpo.batch_size (--rm_train.* for "
                         "the RM) or its micro_batch_size, or the process count")
    if objective.uses_reference:
        if ref_logps is None:
            raise TrainError(f"loss={cfg.loss!r} needs reference log-probs: pass ref_logps "
                             "(train_policy.reference_logps)")
        missing = [e.key for e in examples if e.key not in ref_logps]
        if missing:
            raise TrainError(f"{len(missing)} pairs have no reference log-prob "
                             f"(e.g. {missing[0]})")


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms and biases: no weight decay
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.adam_betas), foreach=True)


def log_row(step, steps_per_epoch, names, vals, denom, lr, world, batch_idx, num_tokens,
            elapsed, step_s, device) -> dict:
    """One metrics.jsonl row: the step's loss (over `denom`)
    and per-example means of the metrics."""
    n_pairs = len(batch_idx)
    counts = dict(zip(names, vals))
    slots, pads = counts.pop(SLOTS, 0), counts.pop(PADS, 0)
    means = {k: v / (denom if k == "loss" else n_pairs) for k, v in counts.items()}
    row = {"step": step + 1, "epoch": step // steps_per_epoch, "loss": means.pop("loss"),
           "lr": lr, "grad_norm": vals[-1] / world}  # every rank added the same (global) norm
    if "correct" in means:
        row["accuracy"] = means.pop("correct")
    row.update(means)
    tokens = sum(num_tokens[i] for i in batch_idx)
    # tokens: the examples' own (no padding, a shared prompt counted in both sequences), global,
    # over this step's time; pad_fraction: the share of computed positions that were padding
    row.update(examples=n_pairs, tokens=tokens, elapsed=round(elapsed, 3),
               tokens_per_s=round(tokens / max(step_s, 1e-9), 1),
               pad_fraction=round(pads / max(slots, 1), 4))
    if device.type == "cuda":  # this rank's peak since the last row (the figure an 8B run is sized by)
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def loss_units(objective: Objective, e: Example) -> int:
    """What the loss is averaged over: pairs, or response tokens for SFT
    (whose targets are tokens)."""
    # token 0 is never a target
    return len(e.chosen) - max(e.chosen_start, 1) if objective.per_token else 1


# ---- batches

SLOTS, PADS = "_slots", "_pads"  # per-step sums that are counts, not per-example metrics


@dataclass
class Batch:
    ids: torch.Tensor  # (N, T): chosen rows then rejected rows (N = 2b), or b rows for sft
    lengths: torch.Tensor  # (N,)
    loss_mask: torch.Tensor  # (N, T) True on response tokens
    attention_mask: torch.Tensor | None  # (N, T) for left padding only; right padding needs none
    ref_chosen: torch.Tensor | None = None  # (b,) summed reference log-probs
    ref_rejected: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        """Positions computed, padding included."""
        return self.ids.numel()

    @property
    def tokens(self) -> torch.Tensor:
        """Real tokens, a device scalar (no host sync: read with the step's other sums)."""
        return self.lengths.sum()

    def logps(self, model, average: bool = False, full_logits: bool = False) -> torch.Tensor:
        """Summed (or averaged) response log-probs per row (N,)."""
        return response_logps(model, self.ids, self.loss_mask, self.attention_mask, average,
                               full_logits)

    def rewards(self, model) -> torch.Tensor:
        """The score head at each row's last real token (N,)."""
        return model.rewards(self.ids, attention_mask=self.attention_mask, lengths=self.lengths)


class Padded:
    """The padded layout of a stage (the reference): `micro_batch_size` examples per micro-batch,
    rows right-padded to the longest."""

    def __init__(self, examples: list[Example], pairwise: bool, micro_batch_size: int,
                 pad_id: int = 0, device="cpu", refs=None):
        self.pairwise, self.micro_batch_size, self.pad_id, self.device, self.refs = (
            pairwise, micro_batch_size, pad_id, device, refs)
        self.sizes = [e.num_tokens for e in examples]

    def micro(self, batch: list[int], rank: int, world: int) -> list[list[int]]:
        return rank_micro_batches(batch, self.sizes, rank, world, self.micro_batch_size)

    def batch(self, examples: list[Example]) -> Batch:
        return collate(examples, self.pairwise, self.pad_id, self.device, refs=self.refs)


def collate(examples: list[Example], pairwise: bool, pad_id: int = 0, device="cpu",
            side: str = "right", refs: dict[str, tuple[float, float]] | None = None) -> Batch:
    """Pad chosen rows then rejected rows into one batch: one forward for both
    (concatenated forward)."""
    seqs = [(e.chosen, e.chosen_start) for e in examples]
    if pairwise:
        seqs += [(e.rejected, e.rejected_start) for e in examples]
    ids, lengths = pad_sequences([s for s, _ in seqs], pad_id, side)  # (N, T), (N,)
    T = ids.shape[1]
    starts = torch.tensor([start for _, start in seqs])
    pos = torch.arange(T)[None]  # (1, T)
    off = T - lengths[:, None] if side == "left" else torch.zeros_like(lengths)[:, None]
    loss_mask = (pos >= off + starts[:, None]) & (pos < off + lengths[:, None])
    am = None
    if side == "left":
        am = (pos >= T - lengths[:, None]).to(device)
    rc = rr = None
    if refs is not None:
        rc = torch.tensor([refs[e.key][0] for e in examples], dtype=torch.float32, device=device)
        rr = torch.tensor([refs[e.key][1] for e in examples], dtype=torch.float32, device=device)
    return Batch(ids.to(device), lengths.to(device), loss_mask.to(device), am, rc, rr)


def global_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step: a fresh permutation per epoch,
    seeded by (seed, epoch).

    Independent of world size and micro-batching; an epoch's last batch may be smaller (kept).
    """
    out = []
    for epoch in range(epochs):
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        out += [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return out


def rank_micro_batches(batch: list[int], num_tokens: list[int], rank: int, world: int,
                       micro: int) -> list[list[int]]:
    """This rank's share of a global batch,
    split into the SAME number of micro-batches on every rank.

    FSDP runs collectives in every forward, so ranks must agree on the count; a rank may get an
    empty micro-batch in a short last batch (the loop then runs a zero-weight forward). Lengths are
    sorted within the share so a micro-batch pads little.
    """
    share = sorted(batch[rank::world], key=lambda i: -num_tokens[i])
    k = math.ceil(math.ceil(len(batch) / world) / micro)
    q, r = divmod(len(share), k)
    sizes = [q + (j < r) for j in range(k)]
    starts = [sum(sizes[:j]) for j in range(k)]
    return [share[s:s + n] for s, n in zip(starts, sizes)]


def lr_at(step: int, total: int, lr: float, warmup_ratio: float,
          min_lr_ratio: float = 0.0) -> float:
    """Linear warmup over ceil(warmup_ratio · total) steps,
    then cosine decay to min_lr_ratio · lr."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- resumable trainer state: model + optimizer (sharded) and meta.json, swapped in atomically


class TrainerState:
    """out_dir/trainer_state: what an interrupted stage resumes from,
    and the record of a finished one."""

    def __init__(self, out_dir: Path, fp: str, total: int, objective: str):
        self.out_dir, self.fp, self.total, self.objective = out_dir, fp, total, objective
        self.dir = out_dir / "trainer_state"
        self.meta = {}
        self.checkpoints: list[Path] = []
        self.elapsed0, self.t0 = 0.0, time.perf_counter()
        if dist.get().is_main:  # a kill between the two renames of save(): keep a complete state
            recover_replaced(self.dir, lambda q: (q / "meta.json").is_file())  # meta.json: written last
        dist.barrier()
        if (self.dir / "meta.json").is_file():
            self.meta = read_json(self.dir / "meta.json")
            if (not isinstance(self.meta, dict)
                    or not {"fingerprint", "step", "done"} <= set(self.meta)):
                raise TrainError(f"{self.dir / 'meta.json'}: not a trainer state (no "
                                 f"fingerprint/step/done). Fix: delete {self.dir} to start this "
                                 "stage over")
            if self.meta["fingerprint"] != fp:
                raise TrainError(f"{out_dir}/trainer_state belongs to another run (different data "
                                 "or hyperparameters). Fix: use a new output directory, or "
                                 f"delete {out_dir}/trainer_state to start over")
            self.checkpoints = [out_dir / c for c in self.meta.get("checkpoints", [])]

    @property
    def last(self) -> dict:
        return self.meta.get("last", {})

    def done(self) -> bool:
        return bool(self.meta.get("done"))

    def elapsed(self, run: bool = False) -> float:
        """Training seconds so far, across resumes (or, with run, of this process only)."""
        return (0.0 if run else self.elapsed0) + time.perf_counter() - self.t0

    def resume(self, model, optimizer) -> int:
        """Load the saved state if any and clean a killed run's partial writes;
        returns the first step."""
        start = 0
        if self.meta and not self.done():
            self._load(model, optimizer)
            rng = torch.frombuffer(bytearray(base64.b64decode(self.meta["rng"])),
                                   dtype=torch.uint8)
            torch.set_rng_state(rng)
            start, self.elapsed0 = self.meta["step"], self.meta["elapsed"]
            dist.print0(f"{self.out_dir}: resuming at step {start}/{self.total}")
        if dist.get().is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # partial writes of a killed run, and states a killed swap left aside
            for tmp in [*self.out_dir.glob(".*.tmp-*"), *self.out_dir.glob(".*.old-*")]:
                shutil.rmtree(tmp, ignore_errors=True)
            metrics = self.out_dir / "metrics.jsonl"
            if metrics.exists():  # keep the rows the saved state covers: later ones are redone
                write_jsonl(metrics, [r for r in _complete_rows(metrics) if r["step"] <= start])
        dist.barrier()
        self.t0 = time.perf_counter()
        return start

    def _meta(self, step: int, done: bool, last: dict) -> dict:
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        return {"step": step, "total": self.total, "fingerprint": self.fp, "rng": rng,
                "done": done, "elapsed": self.elapsed(), "objective": self.objective,
                "checkpoints": [c.name for c in self.checkpoints], "last": last or {}}

    def save(self, model, optimizer, step: int, last: dict):
        """Model + optimizer (sharded, each rank writes its part), then meta.json."""
        meta = self._meta(step, False, last)
        tmp = self.out_dir / f".trainer_state.tmp-{step}"
        if dist.get().is_main and tmp.exists():
            shutil.rmtree(tmp)
        dist.barrier()
        # this rank's shards of the weights and of AdamW's state, as safetensors (no pickle
        # anywhere: a run directory is shared between people, and unpickling runs code); the rest
        # is JSON
        tmp.mkdir(parents=True, exist_ok=True)
        tensors = {f"model/{k}": _local(v) for k, v in model.state_dict().items()}
        osd = optimizer.state_dict()
        for i, st in osd["state"].items():
            tensors.update({f"optim/{i}/{name}": _local(v) for name, v in st.items()})
        save_tensors(tensors, tmp / self._shard(), {"format": "pt"})
        dist.barrier()
        if dist.get().is_main:
            meta["world_size"] = dist.get().world_size
            meta["tensors"] = sorted(tensors)  # what _load must find in every rank's shard
            meta["param_groups"] = [{**g, "betas": list(g["betas"])} for g in osd["param_groups"]]
            write_json(tmp / "meta.json", meta)
            replace_dir(tmp, self.dir)
        dist.barrier()

    def _shard(self) -> str:
        d = dist.get()
        return f"rank{d.rank}-of-{d.world_size}.safetensors"

    def _load(self, model, optimizer):
        """Copy this rank's saved shards into the model's and build AdamW's state from them."""
        path = self.dir / self._shard()
        if (self.meta.get("world_size", dist.get().world_size) != dist.get().world_size
                or not path.is_file()):
            raise TrainError(f"{self.dir}: saved by {self.meta.get('world_size')} processes, "
                             f"resumed with {dist.get().world_size}. Fix: resume with the same "
                             f"process count, or delete {self.dir} to start this stage over")
        try:
            saved = load_file(str(path))
        except Exception as e:  # a truncated or foreign file
            raise TrainError(f"{path}: unreadable ({type(e).__name__}: {e}). Fix: delete "
                             f"{self.dir} to start this stage over") from None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # a state missing any tensor would resume with fresh weights or moments there, silently
        names = self.meta.get("tensors") or [f"model/{k}" for k in model.state_dict()]
        missing = [k for k in names if k not in saved]
        if missing:
            raise TrainError(f"{path}: {len(missing)} tensors missing (e.g. {missing[0]}), so it is "
                             f"not the state this stage saved. Fix: delete {self.dir} to start this "
                             "stage over")
        with torch.no_grad():
            for k, v in model.state_dict().items():
                _local(v, copy=False).copy_(saved[f"model/{k}"])
        state: dict[int, dict] = {}
        for key, t in saved.items():
            if key.startswith("optim/"):
                _, i, name = key.split("/", 2)
                p = params[int(i)]
                if name != "step" and isinstance(p, DTensor):
                    t = DTensor.from_local(t.to(p.to_local().device), p.device_mesh, p.placements)
                state.setdefault(int(i), {})[name] = t
        groups = [{**g, "betas": tuple(g["betas"])} for g in self.meta["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def mark_done(self, last: dict):
        """After `final` is written: keep only meta.json (optimizer state is no longer needed)."""
        meta = self._meta(self.total, True, last)
        if dist.get().is_main:
            tmp = self.out_dir / ".trainer_state.tmp-done"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write_json(tmp / "meta.json", meta)
            replace_dir(tmp, self.dir)
        dist.barrier()


def _local(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor; with copy, a CPU copy of its own
    (safetensors refuses storage shared between names, as tied embeddings share it)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.detach().to("cpu", copy=True).contiguous() if copy else local


def _complete_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows up to the first incomplete one
    (a kill can cut the appended last line)."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            break
        rows.append(row)
    return rows


def fingerprint(objective: Objective, cfg: TrainConfig, examples: list[Example]) -> str:
    """What the weights depend on: objective, hyperparameters, the tokenized data
    (not micro-batching)."""
    h = hashlib.sha256()
    skip = {"micro_batch_size", "activation_checkpointing", "save_every", "packing",
            "share_prompt", "micro_batch_tokens"}
    h.update(json.dumps([objective.name,
                         {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}],
                        default=str).encode())
    for e in examples:
        h.update(json.dumps([e.key, e.chosen_start, e.rejected_start]).encode())
        h.update(array("l", e.chosen + (-1,) + e.rejected).tobytes())
    return h.hexdigest()[:16]


def metrics_summary(out_dir) -> dict:
    """From a stage's metrics.jsonl: steps, last and first loss, and the mean accuracy over the
    last epoch's steps (each measured on its batch before that batch's update:
    online, not memorised)."""
    path = Path(out_dir) / "metrics.jsonl"
    rows = read_jsonl_rows(path) if path.is_file() else []
    if not rows:
        return {}
    last = [r for r in rows if r["epoch"] == rows[-1]["epoch"]]
    out = {"steps": rows[-1]["step"], "loss": rows[-1]["loss"], "first_loss": rows[0]["loss"]}
    if "accuracy" in rows[-1]:
        out["accuracy"] = sum(r["accuracy"] for r in last) / len(last)
        out["margin"] = rows[-1]["margin"]
    return out


def _fail(step, total, batch_idx, micro, local_losses, examples, grad_norm, out_dir, checkpoints):
    """Every rank arrives here together (the flag was all-reduced);
    say where the non-finite value came from."""
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
