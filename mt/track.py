"""Optional experiment tracking: TensorBoard and Weights & Biases mirror what a run writes to its
files, on rank 0 only; off unless asked (--log.tensorboard DIR, --log.wandb PROJECT).

    track.start(cfg.log, run_dir, config)   # run_em.py, train_policy.py, train_rm.py
    track.log_step(out_dir, row)            # mt/train.py: every metrics.jsonl row
    track.log_iteration(k, scalars)         # run_em.py: each iteration's decisions and accuracies
    track.finish()

Per-step scalars are tagged by where their metrics.jsonl lies in the run (`iter1/policy/loss`,
`iter2/rm/accuracy`, stepped by optimizer step); per-iteration ones `iteration/<name>` (stepped by
the iteration, 1, 2, ... across rounds). The files stay the record: a tracker only mirrors them,
and a resumed stage logs its redone steps again. Neither package is imported unless its flag is
given; a missing one is a UserError naming the `pip install`.
"""
from __future__ import annotations

import atexit
import math
from pathlib import Path

from mt import dist
from mt.errors import UserError


class TrackingError(UserError):
    """A tracking flag whose package is not installed."""


def _summary_writer():
    try:
        # optional: imported only with --log.tensorboard (torch's writer needs the tensorboard
        # package)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrackingError(f"--log.tensorboard needs the tensorboard package ({e}). Fix: pip "
                            "install tensorboard, or drop --log.tensorboard") from None
    return SummaryWriter


def _wandb():
    try:
        import wandb  # optional: imported only with --log.wandb
    except ImportError as e:
        raise TrackingError(f"--log.wandb needs the wandb package ({e}). Fix: pip install wandb "
                            "(then `wandb login`, or set WANDB_MODE=offline), or drop "
                            "--log.wandb") from None
    return wandb


def require(log) -> None:
    """Fail before any work when a tracking flag's package is missing (every rank checks, so all
    stop together)."""
    if log.tensorboard:
        _summary_writer()
    if log.wandb:
        _wandb()


def _scalars(d: dict) -> dict[str, float]:
    """The finite numbers of a dict (bools as 0/1); the rest (names, lists) is not a scalar."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Tracker:
    """The writers of one run (rank 0)."""

    def __init__(self, log, run_dir, config: dict | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.name = log.name or self.run_dir.name
        self.tb = self.wb = None
        self.axes: set[str] = set()
        if log.tensorboard:
            self.tb_dir = Path(log.tensorboard) / self.name
            self.tb = _summary_writer()(log_dir=str(self.tb_dir), flush_secs=30)
        if log.wandb:
            self.wb = _wandb().init(project=log.wandb, name=self.name, config=config or {},
                                    dir=str(self.run_dir))

    def tag(self, out_dir) -> str:
        """A training stage's tag prefix: its directory inside the run (iter1/policy)."""
        p = Path(out_dir).resolve()
        rel = p.relative_to(self.run_dir).as_posix() if p.is_relative_to(self.run_dir) else "."
        return p.name if rel == "." else rel

    def log(self, axis: str, step: int, scalars: dict[str, float]):
        """scalars as `axis/<name>` at `step` (a wandb run gets `axis/step` as their x-axis)."""
        tagged = {f"{axis}/{k}": v for k, v in _scalars(scalars).items()}
        if self.tb is not None:
            for k, v in tagged.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            if axis not in self.axes:  # one step axis per stage: each restarts at step 1
                self.wb.define_metric(f"{axis}/step")
                self.wb.define_metric(f"{axis}/*", step_metric=f"{axis}/step")
                self.axes.add(axis)
            self.wb.log({**tagged, f"{axis}/step": step})

    def flush(self):
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None


_ACTIVE: Tracker | None = None


def start(log, run_dir, config: dict | None = None) -> Tracker | None:
    """The run's tracker on rank 0 when a --log flag asks for one (a previous one is closed)."""
    global _ACTIVE
    finish()
    require(log)
    if dist.get().is_main and (log.tensorboard or log.wandb):
        _ACTIVE = Tracker(log, run_dir, config)
        # a run that ends by an exception still writes what it logged (dist.run's os._exit paths
        # skip this, which is why stages flush as they finish)
        atexit.register(_ACTIVE.close)
    return _ACTIVE


def log_step(out_dir, row: dict):
    """One metrics.jsonl row of the training stage writing to out_dir."""
    if _ACTIVE is not None:
        _ACTIVE.log(_ACTIVE.tag(out_dir), int(row["step"]),
                    {k: v for k, v in row.items() if k != "step"})


def log_iteration(k: int, scalars: dict):
    """One iteration's numbers (run_em.py iteration_scalars), then a flush."""
    if _ACTIVE is not None:
        _ACTIVE.log("iteration", k, scalars)
        _ACTIVE.flush()


def flush():
    if _ACTIVE is not None:
        _ACTIVE.flush()


def finish():
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.close()
        _ACTIVE = None
