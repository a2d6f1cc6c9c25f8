"""mt.train.load_for_training over 2 gloo CPU processes: rank 0 alone reads the safetensors and broadcasts; the
sharded model equals load_model's (Llama, tied-embedding Qwen2, a causal LM given a fresh score head), and DPO /
RM runs through train_policy.py / train_rm.py equal the former every-rank load_model path step for step."""
import json
import shutil
from pathlib import Path

import torch

import mt.train as T
import train_policy
import train_rm
from test_train import OBJ
from mt import chat
from mt import dist
from mt.checkpoint import load_for_training
from mt.checkpoint import load_model, load_state_dict
from mt.config import DPOConfig, RMConfig, TrainConfig
from mt.data import read_pairs, write_jsonl
from test_train import metrics
from test_train_dist import WORLD, _spawn



def _count_safetensors_reads(counter: dict):
    """Wrap mt.checkpoint.safe_open (every weight read goes through it) with a call counter; returns the undo."""
    import mt.checkpoint as ck
    real = ck.safe_open

    def counted(*a, **k):
        counter["reads"] += 1
        return real(*a, **k)
    ck.safe_open = counted
    return lambda: setattr(ck, "safe_open", real)


# ---- the loaded model equals load_model's; rank 1 reads nothing and holds half


def _load_job(rank, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from mt.model import rope_inv_freq
    cases = json.loads((out / "cases.json").read_text())
    result = {}
    for name, path, head in cases:
        torch.manual_seed(1234 + 100 * rank)  # only rank 0's draw may matter (the fresh score head)
        counter = {"reads": 0}
        restore = _count_safetensors_reads(counter)
        try:
            model = load_for_training(path, TrainConfig(), head=head)
        finally:
            restore()
        params = list(model.parameters())  # a tied head is one parameter, listed once
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, out / f"{name}.pt")
        result[name] = {
            "reads": counter["reads"],
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "local_numel": sum(p.to_local().numel() for p in params),
            "numel": sum(p.numel() for p in params),
            "tied": hasattr(model, "lm_head") and model.lm_head.weight is model.model.embed_tokens.weight,
            "inv_freq_fp32": (model.inv_freq.dtype == torch.float32
                              and torch.equal(model.inv_freq, rope_inv_freq(model.cfg))),  # rebuilt after to_empty
        }
    try:  # a directory rank 0 cannot read stops every rank with a message (none waits in the broadcast)
        load_for_training(out / "no_weights", TrainConfig())
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _bf16_copy(src, dst) -> Path:
    """The checkpoint stored in bf16 (as 8B checkpoints are): rank 0 broadcasts it as stored, ranks cast."""
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).save_pretrained(str(dst))
    assert {v.dtype for v in load_state_dict(dst).values()} == {torch.bfloat16}
    return dst


def test_sharded_load_equals_load_model(tiny_checkpoint, tmp_path):
    cases = [("llama", str(tiny_checkpoint("llama")), None), ("qwen2_tied", str(tiny_checkpoint("qwen2")), None),
             ("llama31_fresh_score", str(tiny_checkpoint("llama31")), "score"),
             ("llama_bf16", str(_bf16_copy(tiny_checkpoint("llama"), tmp_path / "bf16")), None)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    bad = Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "no_weights"))
    (bad / "model.safetensors").unlink()
    _spawn(_load_job, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    for name, path, head in cases:
        torch.manual_seed(1234)  # rank 0's seed: the fresh score head must be rank 0's draw
        ref = load_model(path, torch.float32, "cpu", head=head).state_dict()
        got = torch.load(tmp_path / f"{name}.pt")
        assert got.keys() == ref.keys(), name
        for k in ref:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]), (name, k)
        assert r0[name]["reads"] >= 1 and r1[name]["reads"] == 0, name  # only rank 0 opens the safetensors
        for r in (r0, r1):
            assert r[name]["all_dtensor"] and r[name]["inv_freq_fp32"], (name, r[name])
            # FSDP shards dim 0: rank 0 holds the odd row of an odd-sized tensor (the (1, C) score head)
            assert 0.45 * r[name]["numel"] <= r[name]["local_numel"] <= r[name]["numel"] / 2 + 64, (name, r[name])
        assert r0[name]["local_numel"] + r1[name]["local_numel"] == r0[name]["numel"]
        assert r0[name]["tied"] == r1[name]["tied"] == (name == "qwen2_tied")
    tied = torch.load(tmp_path / "qwen2_tied.pt")  # the tied head is the embedding in the gathered state too
    assert torch.equal(tied["lm_head.weight"], tied["model.embed_tokens.weight"])
    assert r0["error"].startswith("CheckpointError") and "no model.safetensors" in r0["error"]
    assert r1["error"].startswith("CheckpointError") and "rank 0 could not load" in r1["error"], r1["error"]


# ---- DPO and RM runs through the scripts' new loading == the former every-rank load_model path

QUESTIONS = ["What is two plus two?", "Write a short poem about the sea.", "Explain why the sky is blue",
             "Hello world, how are you today?", "What does the quick brown fox do?", "Is the sea wide?"]
CFG = dict(lr=1e-3, batch_size=4, micro_batch_size=1, epochs=2, seed=5, save_every=0, max_length=128)


def _train_job(rank, out):
    policy, pairs = (out / "policy_dir.txt").read_text(), out / "pairs.jsonl"
    dpo_cfg, rm_cfg = DPOConfig(beta=0.5, **CFG), RMConfig(**CFG)
    # the former path: every rank loads the full model with load_model, then shards it
    tok = chat.load_tokenizer(policy)
    pad = tok.pad_token_id or 0
    ex, _ = chat.policy_examples(tok, read_pairs(pairs), dpo_cfg.max_length)
    model = dist.prepare_model(load_model(policy, torch.float32, "cpu"), dpo_cfg)
    refs = train_policy.reference_logps(model, ex, 2 * dpo_cfg.micro_batch_size, pad, progress=False)
    if rank == 0:
        train_policy.write_ref_logps(out / "old_ref.jsonl", ex, refs)
    T.train(model, ex, OBJ["dpo"], dpo_cfg, out / "old_dpo", ref_logps=refs, pad_id=pad, progress=False)
    ex, _ = chat.rm_examples(tok, read_pairs(pairs), rm_cfg.max_length)
    torch.manual_seed(rm_cfg.seed)
    model = load_model(policy, torch.float32, "cpu", head="score")
    if model.cfg.hf.get("pad_token_id") is None:
        model.cfg.hf["pad_token_id"] = tok.pad_token_id
    T.train(model, ex, OBJ["rm"], rm_cfg, out / "old_rm", pad_id=pad, tokenizer_dir=policy, progress=False)
    # the scripts, which now load with load_for_training; rank 1 must not read the safetensors
    counter = {"reads": 0}
    restore = _count_safetensors_reads(counter)
    try:
        torch.manual_seed(99 + rank)  # the RM head must come from rm_cfg.seed on rank 0, not from here
        train_policy.dpo(Path(policy), pairs, out / "new_ref.jsonl", out / "new_dpo", dpo_cfg)
        train_rm.train(Path(policy), [pairs], out / "new_rm", rm_cfg)
    finally:
        restore()
    (out / f"reads{rank}.json").write_text(json.dumps(counter))


def test_dpo_and_rm_through_the_new_loading_equal_the_former_path(tiny_checkpoint, tmp_path):
    (tmp_path / "policy_dir.txt").write_text(str(tiny_checkpoint("llama")))
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": q}],
                                            "chosen": f"{q} Yes, fine.", "rejected": "no"}
                                           for i, q in enumerate(QUESTIONS)])
    _spawn(_train_job, tmp_path)
    reads = [json.loads((tmp_path / f"reads{r}.json").read_text())["reads"] for r in range(WORLD)]
    assert reads[0] >= 2 and reads[1] == 0  # rank 0 read both models' weights; rank 1 none
    old_ref = {r["pair_id"]: r for r in map(json.loads, (tmp_path / "old_ref.jsonl").read_text().splitlines())}
    new_ref = {r["pair_id"]: r for r in map(json.loads, (tmp_path / "new_ref.jsonl").read_text().splitlines())}
    assert old_ref.keys() == new_ref.keys() and len(old_ref) == 6
    for k in old_ref:
        assert abs(old_ref[k]["ref_chosen_logps"] - new_ref[k]["ref_chosen_logps"]) <= 1e-6
        assert abs(old_ref[k]["ref_rejected_logps"] - new_ref[k]["ref_rejected_logps"]) <= 1e-6
    for old, new, final in (("old_dpo", "new_dpo", "final"), ("old_rm", "new_rm", "final")):
        a, b = metrics(tmp_path / old), metrics(tmp_path / new)
        assert len(a) == len(b) == 4  # 6 pairs, batch 4 (a short last batch), 2 epochs
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= 1e-6, (old, a, b)
        assert max(abs(x["grad_norm"] - y["grad_norm"]) for x, y in zip(a, b)) <= 1e-6
        assert a[-1]["loss"] < a[0]["loss"]  # the runs learn, so equal losses are not equal constants
        wa, wb = load_state_dict(tmp_path / old / final), load_state_dict(tmp_path / new / final)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
