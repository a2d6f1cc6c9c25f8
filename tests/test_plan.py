"""mt/plan.py against what it plans: a training step's planned peak (fake tensors, fake process group) vs the
same step on real CPU tensors over gloo (1 and 2 processes); the sampler's planned KV bytes vs what it
allocates; one DPO and one RM step at the Llama-3-8B shape on a fake 8-rank group."""
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from mt import config as C
from mt import dist, plan, sampler
from mt.model import ModelConfig, Transformer

ROOT = str(Path(__file__).resolve().parents[1])
GiB = 2**30


def shape(hidden, layers, heads, kv, inter, vocab):
    return ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                                "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab})


TINY = dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=256)
SMALL = dict(hidden=256, layers=4, heads=8, kv=4, inter=512, vocab=2048)
LLAMA3_8B = dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256)
CASES = {"tiny": (TINY, 32), "small": (SMALL, 128)}


# ---- planned (fake) == measured (real), 1 and 2 gloo processes

def _real_peak(case, kind, ac, world):
    mc, length = shape(**CASES[case][0]), CASES[case][1]
    if kind == "rm":
        mc.head = "score"
    tcfg = (C.RMConfig if kind == "rm" else C.DPOConfig)(activation_checkpointing=ac, dtype="fp32")
    return plan.measure_step(mc, kind, tcfg, 2, length, fake=False)["Total"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out, jobs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    dist.init_distributed("cpu")
    peaks = [_real_peak(*job, world) for job in jobs]
    if rank == 0:
        Path(out).write_text(json.dumps(peaks))
    tdist.barrier()
    tdist.destroy_process_group()


JOBS = [(case, kind, ac) for case in CASES for kind in ("dpo", "rm") for ac in (True, False)]


@pytest.mark.parametrize("world", [1, 2])
def test_planned_training_peak_matches_real_tensors(tmp_path, world):
    out = tmp_path / "peaks.json"
    mp.spawn(_entry, args=(world, _free_port(), str(out), JOBS), nprocs=world, join=True)
    real = json.loads(out.read_text())
    for (case, kind, ac), r in zip(JOBS, real):
        mc, length = shape(**CASES[case][0]), CASES[case][1]
        if kind == "rm":
            mc.head = "score"
        tcfg = (C.RMConfig if kind == "rm" else C.DPOConfig)(activation_checkpointing=ac, dtype="fp32")
        planned = plan.plan_step(mc, kind, tcfg, 2, length, world)["Total"]
        print(f"{case} {kind} AC={ac} world={world}: planned {planned} real {r} ({planned / r - 1:+.1%})")
        assert abs(planned / r - 1) <= 0.15, (case, kind, ac, planned, r)


def test_depth_extrapolation_equals_full_depth():
    mc, tcfg = shape(**{**SMALL, "layers": 8}), C.DPOConfig(activation_checkpointing=False)
    full = plan.plan_step(mc, "dpo", tcfg, 2, 128, 4, exact=True)["Total"]
    assert plan.plan_step(mc, "dpo", tcfg, 2, 128, 4)["Total"] == pytest.approx(full, rel=0.01)


def test_a_cut_cache_entry_is_measured_again(tmp_path):
    """A kill while the plan cache was written (or a foreign file) costs a measurement, never a crash."""
    mc, tcfg = shape(**TINY), C.DPOConfig(activation_checkpointing=False)
    want = plan.plan_step(mc, "dpo", tcfg, 2, 32, 1, exact=True, cache_dir=str(tmp_path))
    (entry,) = tmp_path.glob("*.json")
    entry.write_text(entry.read_text()[:5])
    assert plan.plan_step(mc, "dpo", tcfg, 2, 32, 1, exact=True, cache_dir=str(tmp_path)) == want
    assert json.loads(entry.read_text()) == want  # rewritten whole


# ---- the sampler allocates what the plan says


def test_planned_kv_bytes_equal_sampler_allocation(monkeypatch):
    mc = shape(**TINY)
    model = Transformer(mc)
    model.init_weights()
    allocated = []

    class Recording(sampler.KVCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            allocated.append(self.k.nbytes + self.v.nbytes)
    monkeypatch.setattr(sampler, "KVCache", Recording)
    s = C.SamplingConfig(slots=4, max_prompt_tokens=12, max_new_tokens=6, greedy=True)
    prompt = list(range(3, 15))  # a prompt at the cap, twice: every prefix the engine keeps is at its longest
    sampler.generate(model, [prompt, prompt], s, n=4)
    assert sum(allocated) == plan.sampling_bytes(mc, s, dtype=torch.float32)["kv_cache"]
    # at the paper's caps, 8B: 0.75 GiB of KV per slot (DESIGN.md §5)
    big, paper = shape(**LLAMA3_8B), C.SamplingConfig()
    per_slot = plan.sampling_bytes(big, paper, 2)["kv_cache"] - plan.sampling_bytes(big, paper, 1)["kv_cache"]
    assert per_slot == 32 * 8 * 6144 * 128 * 2 * 2


def test_paged_rows_at_the_paper_caps_on_an_80_gb_gpu():
    """The paged cache (the GPU default) takes what is free less the sampler's headroom: at 8B on an
    80 GB card (76 GiB for tensors) it holds 128+ rows of a realistic length (a 169-token prompt and a
    1,331-token response), 73 at the full caps, where 128 dense slots would need 96 GiB."""
    big, paper = shape(**LLAMA3_8B), C.SamplingConfig(slots=C.PRESETS["paper"]["sampling.slots"])
    gpu, per_pos = 76 * 2**30, 32 * 8 * 128 * 2 * 2
    pg = plan.paged_rows(big, paper, gpu, 1500)
    dense = plan.sampling_bytes(big, paper)
    rest = dense["Total"] - dense["kv_cache"]
    assert pg["pool"] == gpu - rest - sampler.HEADROOM and pg["Total"] == gpu
    assert pg["at_caps"] == pg["pool"] // (6144 * per_pos) == 73
    assert pg["pool"] // (1500 * per_pos) >= 256 and pg["at_mean"] == paper.slots == 128
    assert pg["need"] == rest + sampler.HEADROOM + 6144 * per_pos
    # without a GPU's limit the pool is every slot's longest row: the dense cache's bytes
    roomy = plan.paged_rows(big, paper, 10**15, 1500)
    assert roomy["pool"] == paper.slots * 6144 * per_pos


# ---- the memory policy at 8B: activation checkpointing keeps a step under 30 GiB on 8 ranks


def test_llama3_8b_steps_on_8_fake_ranks(tmp_path):
    mc = shape(**LLAMA3_8B)
    mc.rope_theta = 500000.0
    params = plan._meta_params(mc)
    n = sum(p.numel() for p in params)
    dpo = plan.plan_step(mc, "dpo", C.DPOConfig(activation_checkpointing=True), 1, 2048, 8)
    # AdamW's two fp32 moments, this rank's eighth, plus its fp32 `step` count per parameter tensor
    assert dpo["OptState"] == 2 * 4 * n // 8 + 4 * len(params)
    assert dpo["Total"] < 30 * GiB
    no_ac = plan.plan_step(mc, "dpo", C.DPOConfig(activation_checkpointing=False), 1, 2048, 8)
    assert no_ac["Total"] > 30 * GiB  # checkpointing is what keeps it under
    rm = shape(**LLAMA3_8B)
    rm.head, rm.rope_theta = "score", 500000.0
    params = plan._meta_params(rm)
    got = plan.plan_step(rm, "rm", C.RMConfig(activation_checkpointing=True), 1, 2048, 8)
    # rank 0's shard is ceil(rows / 8) rows: the (1, 4096) score head is whole on rank 0, not an eighth
    shard = sum(-(-p.shape[0] // 8) * p[0].numel() for p in params)
    assert got["OptState"] == 2 * 4 * shard + 4 * len(params)
    assert got["Total"] < 30 * GiB


# ---- the command: the verdict and its exit status

def test_plan_command_verdict_and_exit_status(tmp_path):
    """`run_em.py plan` on the tiny preset: 0 and "everything fits" on ample memory; on too little, exit 3
    and a verdict naming each stage that does not fit with the flag that fixes it; no run directory made."""
    from test_run_em import args, run_em
    from conftest import make_tiny_checkpoint
    for name, head, seed in (("policy", "lm", 0), ("rm", "score", 1)):
        make_tiny_checkpoint(tmp_path / name, "llama", head, seed=seed, tokenizer_style="chatml")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"hello {i}"}) + "\n"
                                                    for i in range(32)))
    out = tmp_path / "run"
    base = ["plan", *args(tmp_path, out)[:-2], "--plan.gpus", "1", "--plan.budget_s", "5"]
    ok = run_em(base + ["--plan.gpu_gib", "1000"])
    assert "preflight: ok" in ok.stdout and "verdict: everything fits" in ok.stdout
    tight = run_em(base + ["--plan.gpu_gib", "0.0001", "--plan.reserve_gib", "0"], check=False)
    assert tight.returncode == plan.NOT_FIT, tight.stderr[-2000:]
    verdict = tight.stdout.split("verdict:")[1]
    assert "will NOT fit" in verdict
    assert "- sampling: the weights alone do not fit. Fix: a GPU with more memory" in verdict
    assert "- reference pass:" in verdict and "Fix: a smaller --dpo.micro_batch_size" in verdict
    assert not out.exists()  # a plan writes nothing into the run directory
