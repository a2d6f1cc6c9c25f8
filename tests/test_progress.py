"""mt/progress.py: a tqdm bar on a terminal, one line per interval in a log file."""
import io
import sys

from tqdm import tqdm

from mt import progress as P


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_line_per_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = P.LineProgress(100, "DPO (dpo)", unit="step", every_s=10, file=out, clock=clock)
    for _ in range(25):
        clock.t += 1.0  # one step a second
        bar.update(1)
        bar.set_postfix(loss="0.6931")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[DPO (dpo)] 10/100 step (10%) 1 step/s, elapsed 10s, ETA 1m30s, loss=0.6931",
        "[DPO (dpo)] 20/100 step (20%) 1 step/s, elapsed 20s, ETA 1m20s, loss=0.6931",
    ]


def test_every_n_steps_and_a_resumed_start():
    clock, out = Clock(), io.StringIO()
    bar = P.LineProgress(10, "RM", initial=4, unit="step", every_n=3, every_s=0, file=out,
                         clock=clock)
    for _ in range(6):
        clock.t += 2.0
        bar.update(1)
    # the rate counts this process's steps only (not the 4 done before a resume)
    assert out.getvalue().splitlines() == [
        "[RM] 7/10 step (70%) 0.5 step/s, elapsed 6s, ETA 6s",
        "[RM] 10/10 step (100%) 0.5 step/s, elapsed 12s, ETA 0s",
    ]


def test_the_style_follows_the_terminal(monkeypatch, capsys):
    monkeypatch.delenv("MT_PROGRESS", raising=False)
    # under pytest stdout is captured: not a terminal, so lines
    assert isinstance(P.progress(5, "x"), P.LineProgress)
    monkeypatch.setattr(sys, "stdout", type("T", (io.StringIO,), {"isatty": lambda s: True})())
    monkeypatch.setattr(sys, "stderr", type("T", (io.StringIO,), {"isatty": lambda s: True})())
    bar = P.progress(5, "x")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("MT_PROGRESS", "lines")
    assert isinstance(P.progress(5, "x"), P.LineProgress)


def test_disabled_or_off_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("MT_PROGRESS_EVERY", "0.000001")
    for bar in (P.progress(3, "rank 1", enabled=False), P.LineProgress(3, "off", silent=True)):
        for _ in range(3):
            bar.update(1)
        bar.close()
    monkeypatch.setenv("MT_PROGRESS", "off")
    P.progress(3, "off").update(3)
    assert capsys.readouterr().out == ""
