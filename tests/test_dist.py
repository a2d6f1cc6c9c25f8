"""mt.dist.run, every command's exit path, under torchrun with 2 gloo ranks: outputs written by main() survive,
the run exits 0 without interpreter finalisation (where gloo's worker thread can abort the process, see run's
docstring), and an exception in main() still fails the run with its traceback."""
import os
import subprocess
import sys
from pathlib import Path

from mt import config as C

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, sys
from pathlib import Path
import torch
from mt import dist

out, fail_rank = Path(sys.argv[1]), int(sys.argv[2])

def main():
    d = dist.init_distributed("cpu")
    t = torch.tensor([d.rank + 1.0])
    dist.all_reduce_sum(t)
    atexit.register(lambda: (out / f"finalised{d.rank}").write_text("x"))
    if d.rank == fail_rank:
        raise ValueError(f"rank {d.rank} fails on purpose")
    with open(out / f"rank{d.rank}.txt", "w") as f:
        f.write(str(t.item()))
    print(f"rank {d.rank} done", end="")  # unflushed on purpose: run() flushes before leaving

dist.run(main)
"""


def _torchrun(tmp_path, fail_rank):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), str(fail_rank)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_run_leaves_gloo_without_finalising_and_keeps_outputs(tmp_path):
    r = _torchrun(tmp_path, fail_rank=-1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank{k}.txt").read_text() for k in range(2)] == ["3.0", "3.0"]
    assert "rank 0 done" in r.stdout and "rank 1 done" in r.stdout
    assert not list(tmp_path.glob("finalised*")), "gloo runs end with os._exit, before interpreter finalisation"


def test_run_propagates_an_exception_as_a_failed_run(tmp_path):
    r = _torchrun(tmp_path, fail_rank=1)
    assert r.returncode != 0
    assert "ValueError: rank 1 fails on purpose" in r.stdout + r.stderr
    assert not (tmp_path / "rank1.txt").exists()


def test_paper_preset_gives_8b_loads_and_saves_an_hour():
    """torch's default collective timeout (10 minutes) is shorter than rank 0 alone reading or writing 8B
    weights while the other ranks wait in a collective; the paper preset sets 60, the flag's default
    (0) keeps torch's."""
    assert C.parse(["--preset", "paper"], C.Config()).dist.timeout_min == 60
    assert C.Config().dist.timeout_min == 0
