"""Logs a cluster user can follow (issue 17 §4): progress lines in a log file, TensorBoard / wandb
mirroring the run's files, `run_em.py status`, and eval/plot_run.py's figures, on one tiny run."""
import fcntl
import importlib.util
import json
import shutil
import sys
import types

import pytest

import run_em
import train_rm
from mt import config as C
from mt import dist, flags, gold, track
from mt.data import read_json, read_jsonl_rows, read_pseudo_pairs
from mt.errors import UserError
from mt.manifest import run_stages
from mt.status import _hms, eta, status
from test_run_em import args, inputs, run_em as run_em_cli  # noqa: F401 (a fixture)

HAVE_TB = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def logged(inputs, tmp_path_factory):  # noqa: F811
    """A tiny run with a progress line at every update, and TensorBoard when installed."""
    root = tmp_path_factory.mktemp("logged")
    out, tb = root / "run", root / "tb"
    extra = ["--log.tensorboard", str(tb)] if HAVE_TB else []
    p = run_em_cli(args(inputs, out) + extra, env={"MT_PROGRESS_EVERY": "0.000001"})
    return out, tb, p


def test_progress_is_lines_in_a_log_file(logged):
    _, _, p = logged
    lines = p.stdout.splitlines()
    for desc in ("DPO (dpo)", "RM (Bradley-Terry)", "reference log-probs", "scoring", "sampling"):
        ours = [x for x in lines if x.startswith(f"[{desc}] ")]
        assert ours and all(" elapsed " in x and "/s" in x for x in ours), desc
    assert any("ETA" in x for x in lines if x.startswith("[DPO (dpo)] "))
    assert "\r" not in p.stdout and "\r" not in p.stderr  # no bar redraws in a log file, sampling's too
    # no tqdm bar of ours on stderr, and each stage's one-line summary stays
    assert "DPO (dpo):" not in p.stderr and "reference log-probs:" not in p.stderr
    assert sum(x.startswith("dpo: ") for x in lines) == 2


@pytest.mark.skipif(not HAVE_TB, reason="tensorboard is not installed (CI installs it)")
def test_tensorboard_mirrors_metrics_and_iterations(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, tb, _ = logged
    ea = EventAccumulator(str(tb / out.name), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])

    def series(tag):
        return [(e.step, e.value) for e in ea.Scalars(tag)]
    for t in (1, 2):
        for stage in ("policy", "rm"):
            rows = read_jsonl_rows(out / f"iter{t}" / stage / "metrics.jsonl")
            for key in ("loss", "accuracy", "lr", "grad_norm"):
                got = series(f"iter{t}/{stage}/{key}")
                assert [s for s, _ in got] == [r["step"] for r in rows]
                assert [v for _, v in got] == pytest.approx([r[key] for r in rows], rel=1e-6)
        h = read_json(out / f"iter{t}" / "metrics.json")
        want = run_em.iteration_scalars(h)
        assert {f"iteration/{k}" for k in want} <= tags
        for k, v in want.items():
            assert dict(series(f"iteration/{k}"))[t] == pytest.approx(float(v), rel=1e-6), k
        info = read_json(out / f"iter{t}" / "pseudo_pairs.info.json")
        assert dict(series("iteration/eps_t"))[t] == pytest.approx(info["eps_t"], rel=1e-6)
        assert dict(series("iteration/pseudo_kept"))[t] == info["kept_total"]
        assert dict(series("iteration/pseudo_dropped"))[t] == info["n"] - info["kept_total"]
        sel = read_json(out / f"iter{t}" / "selection.json")
        for k, v in sel["candidates"].items():
            assert dict(series(f"iteration/win_rate_{k}"))[t] == pytest.approx(v["win_rate"])


class FakeRun:
    def __init__(self, **kw):
        self.init, self.metrics, self.logs, self.finished = kw, [], [], False

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, d):
        self.logs.append(d)

    def finish(self):
        self.finished = True


def test_wandb_gets_the_same_rows_with_a_step_axis_per_stage(monkeypatch, tmp_path):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "myrun"
    track.start(C.LogConfig(wandb="proj"), run, {"iters": 2})
    track.log_step(run / "iter1" / "policy", {"step": 1, "loss": 0.5, "lr": 1e-3, "note": "x"})
    track.log_iteration(1, {"eps_t": 0.25, "stop": False})
    track.finish()
    (r,) = runs
    assert r.init == {"project": "proj", "name": "myrun", "config": {"iters": 2},
                      "dir": str(run.resolve())}
    assert ("iter1/policy/*", "iter1/policy/step") in r.metrics
    assert ("iteration/*", "iteration/step") in r.metrics
    assert r.logs == [{"iter1/policy/loss": 0.5, "iter1/policy/lr": 1e-3, "iter1/policy/step": 1},
                      {"iteration/eps_t": 0.25, "iteration/stop": 0.0, "iteration/step": 1}]
    assert r.finished and track._ACTIVE is None


def test_tracking_is_off_by_default_and_rank_0_only(monkeypatch, tmp_path):
    assert C.Config().log == C.LogConfig(tensorboard="", wandb="", name="")
    assert track.start(C.LogConfig(), tmp_path) is None
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=None))
    monkeypatch.setattr(dist, "_STATE", dist.Dist(rank=1, world_size=2))
    assert track.start(C.LogConfig(wandb="proj"), tmp_path) is None  # no init on rank 1
    help_text = flags.help_text(C.Config())
    assert "--log.tensorboard" in help_text and "--log.wandb" in help_text


def test_a_missing_package_is_a_user_error_naming_the_install(monkeypatch):
    from eval import plot_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot_run._figure()
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(track.TrackingError, match="pip install wandb"):
        track.require(C.LogConfig(wandb="proj"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(track.TrackingError, match="pip install tensorboard"):
        track.require(C.LogConfig(tensorboard="tb"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_wandb_stops_the_run_before_it_starts(inputs, tmp_path):  # noqa: F811
    p = run_em_cli(args(inputs, tmp_path / "run") + ["--log.wandb", "proj"], check=False)
    assert p.returncode == 2 and "pip install wandb" in p.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_run_from_before_the_log_section_resumes():
    cfg = C.Config()
    old = C.to_dict(cfg)
    del old["log"]
    changed = [c for c in C.diff(old, C.to_dict(cfg))
               if c.split(":")[0] not in flags.scheduling_only(cfg)]
    assert changed == []


# ---- python run_em.py status --out RUN


def test_status_of_a_finished_run(logged):
    out, _, _ = logged
    stages = read_json(out / "manifest.json")["stages"]
    cfg = read_json(out / "config.json")
    assert not gold.enabled(cfg) and run_stages(cfg, False) == list(stages)
    p = run_em_cli(["status", "--out", str(out)])
    text = p.stdout
    assert text.splitlines()[0].startswith(f"{out}: finished; 21 of 21 stages done in ")
    for name in stages:
        assert any(line.split()[:2] == ["done", name] for line in text.splitlines()), name
    for t in (1, 2):
        sel = read_json(out / f"iter{t}" / "selection.json")
        info = read_json(out / f"iter{t}" / "pseudo_pairs.info.json")
        assert f"chosen {sel['chosen']}: win rate {sel['win_rate']:.3f} ≥ τ 0.0" in text
        kept = f"kept {info['kept_total']}/{info['n']}"
        assert f"ε_t {info['eps_t']:.4g} (2×std, lqf): {kept}" in text
    summary = read_json(out / "summary.json")
    assert f"output: policy {summary['policy']}, rm {summary['rm']}" in text


def _partial(run, tmp_path, upto):
    """A copy of `run` whose manifest records the stages up to `upto` only."""
    dst = tmp_path / "partial"
    shutil.copytree(run, dst)
    m = read_json(dst / "manifest.json")
    names = list(m["stages"])
    m["stages"] = {k: m["stages"][k] for k in names[:names.index(upto) + 1]}
    (dst / "manifest.json").write_text(json.dumps(m))
    (dst / "summary.json").unlink()
    return dst


def test_status_beside_a_running_run_never_takes_its_lock(logged, tmp_path):
    run = _partial(logged[0], tmp_path, "iter1/ref_logps")
    holder = open(run / ".lock", "w")  # what mt/manifest.py lock_run_dir holds
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("pid 4242 on testhost\n")
    holder.flush()
    try:
        text = status(run)
        lines = [line.split()[:2] for line in text.splitlines()]
        assert text.startswith(f"{run}: running (pid 4242 on testhost); 5 of 21 stages done")
        assert ["running", "iter1/dpo"] in lines and ["left", "iter1/select"] in lines
        assert ["done", "iter1/ref_logps"] in lines
        # the run still holds its lock, untouched
        other = open(run / ".lock")
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.close()
        assert (run / ".lock").read_text() == "pid 4242 on testhost\n"
    finally:
        holder.close()
    text = status(run)  # the process is gone: stopped, resumable
    assert text.startswith(f"{run}: stopped (rerun the same command to resume); 5 of 21")
    assert ["left", "iter1/dpo"] in [line.split()[:2] for line in text.splitlines()]
    # the ETA: iteration 2's sample, score, pairs and ref_logps timed by iteration 1's; 12 stages of
    # kinds not yet run are named, not guessed
    secs = read_json(run / "manifest.json")["stages"]
    want = sum(secs[f"iter1/{k}"]["seconds"] for k in ("sample", "score", "pairs", "ref_logps"))
    assert f"ETA: {_hms(want)} for 4 of the 16 stages left" in text
    assert "(12 of kinds not yet run: iter1/dpo, iter1/select, iter1/pseudo_pairs, …; add their time)" in text


def test_eta_by_hand():
    rec = {"splits": {"status": "done", "seconds": 1.0},
           "iter1/sample": {"status": "done", "seconds": 10.0},
           "round2/iter1/sample": {"status": "done", "seconds": 30.0},
           "iter1/dpo": {"status": "running"}}
    assert eta(["iter2/sample", "iter1/dpo"], rec) == (20.0, ["iter1/dpo"])  # the mean of 10 and 30
    assert eta(["iter2/sample"], rec, running="iter2/sample", running_for=15.0) == (5.0, [])
    assert eta(["iter2/sample"], rec, running="iter2/sample", running_for=99.0) == (0.0, [])


def test_status_after_a_tau_stop(logged, tmp_path):
    run = _partial(logged[0], tmp_path, "iter1/select")
    sel = read_json(run / "iter1" / "selection.json")
    sel.update(chosen=None, stop=True, best="ckpt-2", win_rate=0.25, tau=0.5)
    (run / "iter1" / "selection.json").write_text(json.dumps(sel))
    for f in ("pseudo_pairs.info.json", "rm_eval.json"):
        (run / "iter1" / f).unlink()
    shutil.rmtree(run / "iter1" / "rm")
    shutil.rmtree(run / "iter2")
    text = status(run)
    lines = [line.split()[:2] for line in text.splitlines()]
    assert text.startswith(f"{run}: finished (τ stop at iter1); 7 of 7 stages done in ")
    assert ", 14 skipped by the τ stop" in text.splitlines()[0]
    assert ["skipped", "iter1/pseudo_pairs"] in lines and ["skipped", "iter2/rm_eval"] in lines
    assert "τ stop: best win rate 0.250 (ckpt-2) < τ 0.5" in text


# ---- eval/plot_run.py


def test_plot_run_draws_the_run_artifacts(logged, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (CI installs it)")
    from eval import plot_run
    out = logged[0]
    plot_run.main([str(out), "--out", str(tmp_path / "figs")])
    # .lock: held while plotting, so two plotters into one folder are refused (issue 27)
    names = sorted(p.name for p in (tmp_path / "figs").iterdir() if p.name != ".lock")
    assert names == ["dpo_steps.png", "pseudo_pairs.png", "rm_accuracy.png", "selection.png"]
    assert all((tmp_path / "figs" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)

    def line(ax, label):
        (ln,) = [ln for ln in ax.lines if ln.get_label() == label]
        return list(ln.get_xdata()), list(ln.get_ydata())
    loss_ax, acc_ax = plot_run.plot_dpo(out).axes
    sel_ax, = plot_run.plot_selection(out).axes
    pseudo_axes = plot_run.plot_pseudo(out).axes
    rm_ax, = plot_run.plot_rm(out).axes
    for t in (1, 2):
        it = out / f"iter{t}"
        rows = read_jsonl_rows(it / "policy" / "metrics.jsonl")
        assert line(loss_ax, f"iter{t}") == ([r["step"] for r in rows], [r["loss"] for r in rows])
        assert line(acc_ax, f"iter{t}")[1] == [r["accuracy"] for r in rows]
        sel = read_json(it / "selection.json")
        x, y = line(sel_ax, f"iter{t} (chose {sel['chosen']})")
        assert y == [v["win_rate"] for v in sel["candidates"].values()]
        assert x[-1] == rows[-1]["step"]  # final/ sits at the last step
        pp = read_pseudo_pairs(it / "pseudo_pairs.jsonl")
        eps = read_json(it / "pseudo_pairs.info.json")["eps_t"]
        ax = pseudo_axes[t]
        assert sum(p.get_height() for p in ax.patches) == sum(r["valid"] for r in pp)
        assert sorted(ln.get_xdata()[0] for ln in ax.lines) == [-eps, eps]
    (tau_line,) = [ln for ln in sel_ax.lines if ln.get_label().startswith("τ = ")]
    assert list(tau_line.get_ydata()) == [0.0, 0.0]
    (train_bars,) = [c for c in rm_ax.containers
                     if c.get_label() == "r_t on its training pairs (last epoch)"]
    assert [b.get_height() for b in train_bars] == [
        train_rm.summary(out / f"iter{t}" / "rm")["train_acc"] for t in (1, 2)]
