"""mt/train.py over 2 gloo CPU processes (FSDP2 `fully_shard`) against one plain process, and the non-finite
stop across ranks. Workers are spawned with torch.multiprocessing and report through files."""
import dataclasses
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

import mt.train as T
import train_policy
from test_train import OBJ
from mt.checkpoint import load_state_dict
from mt.config import DPOConfig, RMConfig
from test_train import EXACT, F64, metrics, random_examples, tiny_model

ROOT = str(Path(__file__).resolve().parents[1])
WORLD = 2



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(job, out: Path):
    mp.spawn(_entry, args=(job, str(out), _free_port()), nprocs=WORLD, join=True)


def _entry(rank: int, job, out: str, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    from mt import dist
    dist.init_distributed("cpu")
    dist.run(lambda: job(rank, Path(out)))  # the commands' own exit path


# ---- FSDP over 2 processes == 1 process

# 17 pairs, global batch 8, micro 2: steps of 8, 8 and 1 pairs per epoch. World 2 runs accumulation 2, and in
# the 1-pair step rank 1 has nothing: it must still run a (zero-weight) forward for FSDP's collectives.
N, CFG = 17, dict(lr=1e-3, batch_size=8, micro_batch_size=2, epochs=2, seed=5)


def _config(objective, packing=True):  # float64: these tests claim two computations are the same (test_train.F64)
    cfg = dict(CFG, packing=packing, **F64)
    return DPOConfig(beta=0.5, **cfg) if objective == "dpo" else RMConfig(**cfg)


def _train(objective, out: Path, packing=True):
    """Packed by default (mt/packing.py); packing=False is the padded reference layout."""
    ex = random_examples(N, seed=11)
    model = tiny_model("score" if objective == "rm" else "lm", seed=2, dtype=torch.float64)
    refs = (train_policy.reference_logps(model, ex, 3, progress=False, packing=packing)
            if objective == "dpo" else None)
    T.train(model, ex, OBJ[objective], _config(objective, packing), out / objective, ref_logps=refs,
            progress=False)
    return refs


def _equal_job(rank, out):
    for objective in ("dpo", "rm"):
        refs = _train(objective, out)  # the FSDP path: world > 1
        if rank == 0 and refs is not None:
            (out / "refs.json").write_text(json.dumps(refs))


def test_fsdp_two_processes_equal_one_process(tmp_path):
    """Packed (the default) over 2 FSDP processes == packed in one == padded in one (the reference)."""
    _spawn(_equal_job, tmp_path / "fsdp")
    refs1 = _train("dpo", tmp_path / "one")
    _train("rm", tmp_path / "one")
    refs_padded = _train("dpo", tmp_path / "padded", packing=False)
    _train("rm", tmp_path / "padded", packing=False)
    refs2 = json.loads((tmp_path / "fsdp" / "refs.json").read_text())
    assert refs2.keys() == refs1.keys() == refs_padded.keys()
    assert max(abs(a - b) for k in refs1 for a, b in zip(refs1[k], refs2[k])) <= EXACT
    assert max(abs(a - b) for k in refs1 for a, b in zip(refs_padded[k], refs2[k])) <= EXACT
    for objective, one_dir in [(o, d) for o in ("dpo", "rm") for d in ("one", "padded")]:
        one, two = metrics(tmp_path / one_dir / objective), metrics(tmp_path / "fsdp" / objective)
        assert len(one) == len(two) == 6
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= EXACT
        assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(one, two)) <= EXACT
        assert [a["examples"] for a in two] == [8, 8, 1, 8, 8, 1]
        assert one[-1]["loss"] < one[0]["loss"]
        p1 = load_state_dict(tmp_path / one_dir / objective / "final")
        p2 = load_state_dict(tmp_path / "fsdp" / objective / "final")
        assert p1.keys() == p2.keys()
        assert {v.dtype for v in p1.values()} == {torch.float64}
        assert max((p1[k] - p2[k]).abs().max().item() for k in p1) <= EXACT


# ---- a NaN on one rank stops both ranks before the update; the last checkpoint is untouched


def _nan_job(rank, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    ex = random_examples(16, seed=12)
    model = tiny_model(seed=3)
    refs = train_policy.reference_logps(model, ex, 4, progress=False)
    real, calls, seen = OBJ["dpo"].step, {"n": 0}, {}

    def nan_on_rank1_step3(model, batch, cfg):
        calls["n"] += 1  # one micro-batch per step per rank (batch 4 = micro 2 × world 2)
        if calls["n"] == 3 and rank == 0:
            seen["sha"] = hashlib.sha256((out / "run" / "ckpt-2" / "model.safetensors").read_bytes()).hexdigest()
        loss, m = real(model, batch, cfg)
        return (loss * float("nan") if calls["n"] == 3 and rank == 1 else loss), m
    nan_objective = dataclasses.replace(OBJ["dpo"], step=nan_on_rank1_step3)
    result = {"rank": rank}
    try:
        T.train(model, ex, nan_objective, DPOConfig(lr=1e-2, beta=0.5, batch_size=4, micro_batch_size=2, save_every=2),
                out / "run", ref_logps=refs, progress=False)
    except T.NonFiniteError as e:
        result["error"] = str(e)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        saved = load_state_dict(out / "run" / "ckpt-2")
        result["max_diff_vs_ckpt2"] = max((full[k] - saved[k]).abs().max().item() for k in saved)
        result["sha_before"] = seen["sha"]
        result["sha_after"] = hashlib.sha256((out / "run" / "ckpt-2" / "model.safetensors").read_bytes()).hexdigest()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def test_nan_on_one_rank_stops_every_rank_before_the_update(tmp_path):
    _spawn(_nan_job, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    for r in (r0, r1):  # both ranks raised, and both name the rank and step where it happened
        assert "step 3/4" in r["error"] and "rank 1 micro-batch 0: loss nan" in r["error"], r
        assert "before the optimizer step" in r["error"]
    assert r0["max_diff_vs_ckpt2"] == 0.0  # the sharded weights are still exactly the step-2 weights
    assert r0["sha_before"] == r0["sha_after"]
    assert not (tmp_path / "run" / "ckpt-3").exists() and not (tmp_path / "run" / "final").exists()
    assert json.loads((tmp_path / "run" / "trainer_state" / "meta.json").read_text())["step"] == 2
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]


# ---- an interrupted 2-rank run resumes from its per-rank safetensors shards to the same weights


class _Crash(Exception):
    pass


def _resume_job(rank, out):
    ex = random_examples(N, seed=11)
    cfg = DPOConfig(beta=0.5, **{**CFG, "epochs": 3}, save_every=2)  # 9 steps, state saved at 2, 4, 6, 8
    refs = train_policy.reference_logps(tiny_model(seed=2), ex, 3, progress=False)
    T.train(tiny_model(seed=2), ex, OBJ["dpo"], cfg, out / "whole", ref_logps=refs, progress=False)
    calls = {"n": 0}

    def crash_in_step_7(model, batch, cfg):  # per rank: 2, 2, 1 micro-batches in each epoch's steps
        calls["n"] += 1
        if calls["n"] == 11:
            raise _Crash
        return OBJ["dpo"].step(model, batch, cfg)
    try:
        T.train(tiny_model(seed=2), ex, dataclasses.replace(OBJ["dpo"], step=crash_in_step_7), cfg, out / "cut",
                ref_logps=refs, progress=False)
    except _Crash:
        pass
    res = T.train(tiny_model(seed=7), ex, OBJ["dpo"], cfg, out / "cut", ref_logps=refs, progress=False)
    if rank == 0:
        (out / "resumed.json").write_text(json.dumps({"from": res.resumed_from}))


def test_two_rank_run_resumes_bitwise_from_its_safetensors_shards(tmp_path):
    _spawn(_resume_job, tmp_path)
    assert json.loads((tmp_path / "resumed.json").read_text())["from"] == 6  # the last state before step 7
    state = sorted(p.name for p in (tmp_path / "cut" / "trainer_state").iterdir())
    assert state == ["meta.json"]  # a finished stage keeps only its record; no pickle was ever written
    a, b = load_state_dict(tmp_path / "whole" / "final"), load_state_dict(tmp_path / "cut" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = [[{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in metrics(tmp_path / d)]
               for d in ("whole", "cut")]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 9  # every step logged once, with the same values


# ---- HSDP: 4 gloo processes as a 2 × 2 mesh (replicate × shard) == 1 process


def _hsdp_entry(rank: int, out: str, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    from mt import dist
    d = dist.init_distributed("cpu", shard_size=2)
    assert d.shard_size == 2


    def job():
        _train("dpo", Path(out))
        mesh = next(dist.prepare_model(tiny_model(), DPOConfig(), fsdp=True).parameters()).device_mesh
        if rank == 0:  # the parameters really live on a 2-D (replicate, shard) mesh
            (Path(out) / "mesh.json").write_text(json.dumps([mesh.ndim, list(mesh.mesh_dim_names)]))
    dist.run(job)


def test_hsdp_two_by_two_equals_one_process(tmp_path):
    # N = 17 pairs, batch 8, micro 2 (CFG): steps of 8, 8, 1; on 4 ranks a rank may hold nothing in a step
    mp.spawn(_hsdp_entry, args=(str(tmp_path / "hsdp"), _free_port()), nprocs=4, join=True)
    refs1 = _train("dpo", tmp_path / "one")
    one, four = metrics(tmp_path / "one" / "dpo"), metrics(tmp_path / "hsdp" / "dpo")
    assert len(one) == len(four) == 6
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, four)) <= EXACT
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(one, four)) <= EXACT
    p1 = load_state_dict(tmp_path / "one" / "dpo" / "final")
    p4 = load_state_dict(tmp_path / "hsdp" / "dpo" / "final")
    assert p1.keys() == p4.keys() and max((p1[k] - p4[k]).abs().max().item() for k in p1) <= EXACT
    assert json.loads((tmp_path / "hsdp" / "mesh.json").read_text()) == [2, ["replicate", "shard"]]
    assert refs1
