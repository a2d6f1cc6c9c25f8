"""All distributed set-up in one place: torchrun → NCCL on GPU, gloo on CPU; plain python = world of 1."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE = Dist()


def init_distributed(device: str | None = None) -> Dist:
    """Initialise once from torchrun's environment; safe to call again (returns the same state)."""
    global _STATE
    if "RANK" not in os.environ:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _STATE = Dist(device=dev)
        return _STATE
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    _STATE = Dist(rank, world, local, torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"))
    return _STATE


def ensure_process_group(device: torch.device):
    """FSDP2 needs a process group even for one process (plain `python` on one GPU): make a private one."""
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


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
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

    A process that ran gloo collectives (CPU, or the private group of a single process) ends with os._exit,
    skipping the interpreter's finalisation. Why: gloo's worker thread drops the last collective's work object
    a moment after the caller has its result, and that object's saved thread-local state holds Python objects;
    if the drop lands while the interpreter is finalising, the thread takes the GIL from a dying interpreter and
    the process aborts ("terminate called without an active exception", SIGABRT) after every output was
    written — about 1 run in 50 of a 2-rank CPU job here, twice in one CI run. A core dump shows exactly that
    stack (ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~ThreadLocalState -> take_gil during Py_Finalize).
    Everything a command writes is closed (and renamed into place) before main() returns, so skipping
    finalisation loses nothing. NCCL-only runs exit normally. An exception in main() propagates unchanged.
    """
    main()
    if not (dist.is_available() and dist.is_initialized()):
        return
    gloo = "gloo" in str(dist.get_backend()).lower()
    barrier()  # no rank leaves while a peer is still inside a collective
    dist.destroy_process_group()
    if gloo:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
