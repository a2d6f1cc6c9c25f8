"""All distributed set-up in one place: torchrun → NCCL on GPU, gloo on CPU;
plain python = world of 1.

Also the device policy of training (dtypes, FSDP2 wrapping, activation checkpointing), kept out of
the training loop as torchtitan keeps `apply_fsdp` out of its `train.py`.
"""
from __future__ import annotations

import datetime
import functools
import gc
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from mt.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    shard_size: int = 0  # HSDP: shard within groups of this many ranks, replicate across; 0 = plain FSDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE = Dist()


def init_distributed(device: str | None = None, timeout_min: float = 0,
                     shard_size: int = 0) -> Dist:
    """Initialise once from torchrun's environment; safe to call again (returns the same state).

    timeout_min: the process group's collective timeout (0 = torch's default); shard_size: HSDP, a
    2-D mesh that shards inside groups of shard_size ranks (a node) and replicates across them.
    """
    global _STATE
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1
    if shard_size and world % shard_size:  # in one process too: the flag would be ignored
        raise UserError(f"--dist.shard_size={shard_size} does not divide the {world} "
                        f"process{'es' if world > 1 else ''}. Fix: use the processes per node, or 0 "
                        "for plain FSDP")
    if "RANK" not in os.environ:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _STATE = Dist(device=dev)
        return _STATE
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                          int(os.environ["LOCAL_RANK"]))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        kw = {"timeout": datetime.timedelta(minutes=timeout_min)} if timeout_min else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    _STATE = Dist(rank, world, local,
                  torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"),
                  shard_size if shard_size and shard_size < world else 0)
    return _STATE


def init_from(cfg) -> Dist:
    """init_distributed from a command's Config: --device, --dist.timeout_min, --dist.shard_size."""
    return init_distributed(None if cfg.device == "auto" else cfg.device, cfg.dist.timeout_min,
                            cfg.dist.shard_size)


def ensure_process_group(device: torch.device):
    """FSDP2 needs a process group even for one process
    (plain `python` on one GPU): make a private one."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def get() -> Dist:
    return _STATE


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs):
    if _STATE.is_main:
        print(*args, **kwargs, flush=True)


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(items: list) -> list:
    """This rank's share of a list, by stride, so shards stay balanced and deterministic."""
    return items[_STATE.rank::_STATE.world_size]


def gather_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank (small Python objects only)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run(main: Callable[[], object]) -> None:
    """Every command's `__main__`: main(), then every rank leaves the process group together.

    A UserError (a bad file, flag or directory: mt/errors.py) is printed as its one paragraph,
    `error: ...`, and the process exits with status 2; `MT_DEBUG=1` shows its traceback. A bug
    keeps its traceback.

    A process that ran gloo collectives (CPU, or the private group of a single process) ends with
    os._exit, skipping the interpreter's finalisation. Why: gloo's worker thread drops the last
    collective's work object a moment after the caller has its result, and that object's saved
    thread-local state holds Python objects; if the drop lands while the interpreter is finalising,
    the thread takes the GIL from a dying interpreter and the process aborts ("terminate called
    without an active exception", SIGABRT) after every output was written — about 1 run in 50 of a
    2-rank CPU job here, twice in one CI run. A core dump shows exactly that stack
    (ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~ThreadLocalState -> take_gil during
    Py_Finalize). Everything a command writes is closed (and renamed into place) before main()
    returns, so skipping finalisation loses nothing. NCCL-only runs exit normally. Any other
    exception propagates unchanged.
    """
    try:
        main()
    except UserError as e:
        if os.environ.get("MT_DEBUG") == "1":
            raise
        if _first_to_report(str(e)):
            prefix = f"[rank {_STATE.rank}] " if _STATE.world_size > 1 else ""
            print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # no finalisation: a peer may still be inside a collective (see above)
    if not (dist.is_available() and dist.is_initialized()):
        return
    gloo = "gloo" in str(dist.get_backend()).lower()
    barrier()  # no rank leaves while a peer is still inside a collective
    dist.destroy_process_group()
    if gloo:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _first_to_report(message: str) -> bool:
    """Whether this rank prints `message`: under torchrun every rank that hits the same user error
    (a batch size, a flag) would print it once each; the first rank of a node to claim it prints.
    A message only some ranks hit is still printed by them."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if _STATE.world_size == 1 or not run_id:
        return True
    key = hashlib.sha256(f"{run_id}\0{os.getppid()}\0{message}".encode()).hexdigest()[:16]
    try:
        os.close(os.open(os.path.join(tempfile.gettempdir(), f"mt-error-{key}"),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True
# ---- memory between stages


def release():
    """Free what a finished stage left: collect reference cycles (an FSDP2 module is one: DESIGN.md §4),
    then hand the CUDA caching allocator's free blocks back, so the next stage (another model) finds them."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def releases(stage: Callable) -> Callable:
    """A stage function that releases its memory on return: `release()` runs after `stage` has
    returned, when its locals (model, optimizer, KV cache) are gone, not inside it, where they are alive."""
    @functools.wraps(stage)
    def run_stage(*args, **kwargs):
        try:
            return stage(*args, **kwargs)
        finally:
            release()
    return run_stage


# ---- the device policy of training: dtypes, FSDP2, activation checkpointing

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}
# master weights: fp32, or fp64 when asked (the exactness tests compare two summation orders, which
# only float64 makes equal to a tolerance that holds on every CPU)
FULL = (torch.float32, torch.float64)


def resolve_dtype(dtype, device) -> torch.dtype:
    """A dtype flag as a torch dtype: "auto" (or None) = bf16 on a GPU,
    fp32 on the CPU; names as in DTYPES."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} (or "
                         "auto: bf16 on a GPU, fp32 on the CPU)")
    return DTYPES[dtype]


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def uses_fsdp(cfg, device: torch.device, fsdp: bool | None = None) -> bool:
    """FSDP when asked, else whenever world > 1, on GPU, or for bf16
    (mixed precision is FSDP's policy)."""
    if fsdp is not None:
        return fsdp
    return (get().world_size > 1 or device.type == "cuda"
            or resolve_dtype(cfg.dtype, device) not in FULL)


def prepare_model(model, cfg, device=None, fsdp: bool | None = None):
    """fp32 master weights on `device`; FSDP2 per block then the root (bf16 params, fp32 reductions
    on GPU); activation checkpointing per block. Returns the same module,
    wrapped in place; idempotent.

    A model on the meta device (see checkpoint.load_for_training) is sharded first, then only this
    rank's shards are allocated, empty: the caller loads the weights."""
    if is_sharded(model):
        return model
    device = torch.device(device or get().device)
    dtype = resolve_dtype(cfg.dtype, device)
    fsdp = uses_fsdp(cfg, device, fsdp)
    if dtype not in FULL and not fsdp:
        raise ValueError(f"dtype {dtype} needs FSDP's mixed precision (fsdp=True)")
    if get().world_size > 1 and not fsdp:
        raise ValueError(f"world size {get().world_size} needs FSDP (fsdp=True): nothing else "
                         "syncs the gradients")
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and not fsdp:
        raise ValueError("a model on the meta device has no weights: load it with load_model (or "
                         "use FSDP)")
    # master weights stay fp32 (fp64 if asked); FSDP casts a bf16 copy for compute
    model.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if cfg.activation_checkpointing:
        for block in model.model.layers:
            # overriding forward (not wrapping the module) keeps Hugging Face parameter names
            block.forward = (lambda *a, _f=block.forward, **k:
                             checkpoint(_f, *a, use_reentrant=False, **k))
    if not fsdp:
        return model.to(device)
    ensure_process_group(device)
    world, shard = dist.get_world_size(), get().shard_size
    if shard:  # HSDP (DESIGN.md §5): replicate across groups (nodes), shard inside each
        mesh = init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.promote_types(dtype, torch.float32))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # embeddings, final norm, head; moves shards to the device
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if on_meta:
        # allocate this rank's shards only (uninitialised);
        # Transformer._apply rebuilds the fp32 rope buffer
        model.to_empty(device=device)
    return model
