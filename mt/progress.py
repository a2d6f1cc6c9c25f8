"""Progress that a cluster log can hold: a tqdm bar on a terminal, otherwise one plain line now
and then.

    bar = progress(total, "DPO (dpo)", enabled=d.is_main, unit="step")
    bar.update(1); bar.set_postfix(loss="0.6931"); bar.close()

A tqdm bar redraws itself many times a second; in a Slurm log (stdout and stderr are files) every
redraw is kept, and a day's run leaves megabytes of carriage returns. So a bar is drawn only when
both stdout and stderr are terminals; otherwise the same calls print one line to stdout every
MT_PROGRESS_EVERY seconds (default 30, and every `every_n` steps when a caller gives it), with the
rate and the ETA:

    [DPO (dpo)] 120/1000 step (12%) 0.84 step/s, elapsed 2m23s, ETA 17m27s, loss=0.6931

Each stage's one-line summary (printed by the stage itself) is unchanged. MT_PROGRESS=bar | lines
| off forces a style (auto by default).
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

STYLES = ("auto", "bar", "lines", "off")


def style() -> str:
    """bar, lines or off: MT_PROGRESS, or auto = bar when stdout and stderr are terminals."""
    s = os.environ.get("MT_PROGRESS", "auto").strip().lower() or "auto"
    if s not in STYLES:
        s = "auto"
    if s == "auto":
        tty = all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))
        return "bar" if tty else "lines"
    return s


def every_seconds() -> float:
    """MT_PROGRESS_EVERY: seconds between two progress lines (default 30)."""
    try:
        return max(0.0, float(os.environ.get("MT_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def progress(total: int, desc: str, enabled: bool = True, *, initial: int = 0, unit: str = "it",
             every_n: int = 0, every_s: float | None = None):
    """A progress object with tqdm's update / set_postfix / close: a tqdm bar on a terminal,
    a LineProgress in a log file, a silent one when not enabled (e.g. on ranks other than 0)."""
    s = style() if enabled else "off"
    if s == "bar":
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, desc, initial=initial, unit=unit, every_n=every_n,
                        every_s=every_seconds() if every_s is None else every_s,
                        silent=s == "off")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LineProgress:
    """tqdm's interface, printing one line every `every_s` seconds or `every_n` steps (whichever
    comes first; 0 turns either off). Nothing is printed at close: the stage's summary follows."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it",
                 every_n: int = 0, every_s: float = 30.0, silent: bool = False, file=None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every_n, self.every_s, self.silent = every_n, every_s, silent
        self.file, self.clock = file, clock
        self.postfix = ""
        self.t0 = self.last_t = clock()
        self.n0 = self.last_n = initial
        self.lines = 0

    def update(self, n: int = 1):
        self.n += n
        if self.silent:
            return
        now = self.clock()
        due_n = self.every_n and self.n - self.last_n >= self.every_n
        due_s = self.every_s and now - self.last_t >= self.every_s
        if due_n or due_s:
            self.last_t, self.last_n = now, self.n
            self.lines += 1
            print(self.line(now), file=self.file or sys.stdout, flush=True)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        rate = (self.n - self.n0) / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = (f", ETA {_hms((self.total - self.n) / rate)}" if self.total and rate > 0
               else "")
        return (f"[{self.desc}] {self.n}{total} {self.unit}{pct} {rate:.3g} {self.unit}/s, "
                f"elapsed {_hms(elapsed)}{eta}" + (f", {self.postfix}" if self.postfix else ""))

    def set_postfix(self, **kw):
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
