"""An interrupted stage restarts cleanly: a run SIGKILLed mid-training, or mid-save, then rerun, ends with
final weights bitwise equal to an uninterrupted run, and checkpoints already written are never corrupted."""
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mt.train as T
import train_policy
from mt.checkpoint import load_state_dict
from mt.config import DPOConfig
from test_train import OBJ, metrics, random_examples, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CFG = DPOConfig(lr=5e-3, beta=0.5, batch_size=4, micro_batch_size=2, epochs=2, save_every=2, seed=1)  # 8 steps



def job(out, kill: str = ""):
    """Train; with `kill`, SIGKILL this process at a chosen moment (what a preempted job sees)."""
    out = Path(out)
    ex = random_examples(14, seed=21)
    model = tiny_model(seed=4)
    refs = train_policy.reference_logps(model, ex, 4, progress=False)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    objective = OBJ["dpo"]
    if kill == "mid-step-5":  # the 9th micro-batch is the first of step 5 (two per step)
        real, calls = objective.step, {"n": 0}

        def step(*a):
            calls["n"] += 1
            if calls["n"] == 9:
                die()
            return real(*a)
        objective = dataclasses.replace(objective, step=step)
    elif kill == "state-4-between-renames":  # the old state renamed aside, the new one not yet in place
        import mt.checkpoint as C
        real_replace = C.replace_dir

        def replace(tmp, dst):
            if dst.name == "trainer_state" and "tmp-4" in tmp.name:
                os.replace(dst, dst.parent / f".{dst.name}.old-deadbeef")
                die()
            return real_replace(tmp, dst)
        C.replace_dir = T.replace_dir = replace
    elif kill in ("ckpt-4-rename", "state-4-rename"):  # after the files are written, before the swap into place
        import mt.checkpoint as C
        target = "ckpt-4" if kill == "ckpt-4-rename" else "trainer_state"
        real_replace = C.replace_dir

        def replace(tmp, dst):
            if dst.name == target and (target == "ckpt-4" or "tmp-4" in tmp.name):
                die()
            return real_replace(tmp, dst)
        C.replace_dir = T.replace_dir = replace
    return T.train(model, ex, objective, CFG, out, ref_logps=refs, progress=False)


def _killed(out, kill):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    code = "import sys, test_train_resume as t; t.job(sys.argv[1], sys.argv[2])"
    p = subprocess.run([sys.executable, "-c", code, str(out), kill], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: CPU kernels split reductions by thread count
    job(out)
    torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("kill, state_step, ckpts_left", [
    ("mid-step-5", 4, ["ckpt-2", "ckpt-4"]),  # between checkpoints
    ("ckpt-4-rename", 2, ["ckpt-2"]),  # while writing a checkpoint: the temp dir is never swapped in
    ("state-4-rename", 2, ["ckpt-2", "ckpt-4"]),  # checkpoint written, resume state not yet: redo steps 3-4
])
def test_rerun_after_sigkill_matches_an_uninterrupted_run(tmp_path, reference, kill, state_step, ckpts_left):
    import json
    _killed(tmp_path, kill)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ckpts_left
    assert json.loads((tmp_path / "trainer_state" / "meta.json").read_text())["step"] == state_step
    assert not (tmp_path / "final").exists()
    before = {c: sha(tmp_path / c / "model.safetensors") for c in ckpts_left}
    for c in ckpts_left:  # what was saved equals the uninterrupted run's checkpoint
        assert before[c] == sha(reference / c / "model.safetensors")

    assert job(tmp_path).resumed_from == state_step  # the rerun resumes; it does not start over
    assert {c: sha(tmp_path / c / "model.safetensors") for c in ckpts_left} == before
    want, got = load_state_dict(reference / "final"), load_state_dict(tmp_path / "final")
    assert all(torch.equal(want[k], got[k]) for k in want)  # bitwise
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-2", "ckpt-4", "ckpt-6"]
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference)]  # no duplicate rows
    assert not list(tmp_path.glob(".*tmp*"))  # the killed run's partial temp directories were cleared


def test_kill_between_the_two_renames_of_a_state_swap_resumes_from_the_new_state(tmp_path, reference):
    """Neither saved state is lost: the complete new one (step 4) is put back, the old one cleared."""
    _killed(tmp_path, "state-4-between-renames")
    assert not (tmp_path / "trainer_state").exists()
    assert (tmp_path / ".trainer_state.old-deadbeef" / "meta.json").is_file()
    assert (tmp_path / ".trainer_state.tmp-4" / "meta.json").is_file()
    assert job(tmp_path).resumed_from == 4  # not 0: hours at 8B
    want, got = load_state_dict(reference / "final"), load_state_dict(tmp_path / "final")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(reference)]
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob(".*old*"))
