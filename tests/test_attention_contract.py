"""Every attention call of sampling, training, scoring and the reference pass is one that PyTorch's CUDA
dispatcher sends to a fused kernel (flash or memory-efficient), never to the math kernel; and every stage
leaves no model, optimizer or KV cache alive when it returns (DESIGN.md §4).

No GPU here: `cuda_kernels` encodes the dispatcher's rule for a call, and a spy on
F.scaled_dot_product_attention checks every call the stages make on a tiny grouped-query model. The
stages run once (2 shared CPU cores) and both checks look at the same run.
"""
from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import train_policy
import train_rm
from mt import config as C
from mt import model as M
from mt.data import write_jsonl
from mt.model import KVCache, PagedKVCache, Transformer
from mt.scoring import score_file

QUESTIONS = ["What is two plus two?", "Write a short poem about the sea.", "Explain why the sky is blue",
             "Hello world, how are you today?"]


def cuda_kernels(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, dropout=0.0) -> set[str]:
    """The fused CUDA kernels of scaled_dot_product_attention that accept this call: a subset of
    {"flash", "efficient"}; empty = the math kernel. The conditions are the checks of PyTorch's
    aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (use_flash_attention, use_mem_efficient_attention,
    torch 2.5 - 2.7), for dense inputs on an sm80+ GPU with the fused kernels enabled. The dtype is
    taken to be bf16, what a GPU run computes in (mt/dist.py resolve_dtype), whatever it is here.
    cuDNN attention is left out (off by default on most of the releases we allow)."""
    ok = {"flash", "efficient"}
    # check_tensor_shapes: dense q, k, v are 4-D (B, H, L, D)
    if not (q.dim() == k.dim() == v.dim() == 4):
        return set()
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    # check_batch_size_and_num_heads_dense: one batch size
    if not (k.shape[0] == v.shape[0] == B):
        return set()
    if not (Hq == Hk == v.shape[1]):
        # check_batch_size_and_num_heads_dense<supports_gqa=false> (efficient): equal head counts
        ok.discard("efficient")
        # ... <supports_gqa=true> (flash) -> check_grouped_query_attention: enable_gqa, k and v heads equal,
        # query heads a multiple of them
        if not (enable_gqa and Hk == v.shape[1] and Hq % Hk == 0):
            ok.discard("flash")
    # check_head_dim_size_flash: equal head dims, at most 256
    if not (D == k.shape[-1] == v.shape[-1] and D <= 256):
        ok.discard("flash")
    # check_head_dim_size_mem_efficient: q and k head dims equal, q and v ones a multiple of the alignment
    # (8 for 16-bit dtypes in the releases that check it)
    if not (D == k.shape[-1] and D % 8 == 0 and v.shape[-1] % 8 == 0):
        ok.discard("efficient")
    # check_for_attn_mask: flash takes no mask
    if attn_mask is not None:
        ok.discard("flash")
        # validate_sdpa_input: a mask is bool or the query's dtype, and broadcasts to (B, H, Lq, Lk)
        if attn_mask.dtype not in (torch.bool, q.dtype):
            return set()
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, Hq, Lq, Lk))
        except RuntimeError:
            return set()
    # check_flash_causal_non_square_seqlens: flash's is_causal needs Lq == Lk
    if is_causal and Lq != Lk:
        ok.discard("flash")
    # check_last_dim_stride_equals_1_dense: contiguous head dims (flash ignores singleton dims, efficient not)
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        ok.discard("efficient")
        if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (q, k, v)):
            ok.discard("flash")
    # check_nonzero_sequence_lengths_dense
    if Lq == 0 or Lk == 0:
        return set()
    # check_dtypes_low_precision (flash: fp16/bf16) and the efficient kernel's dtypes: bf16 assumed (above)
    return ok


def test_the_rule_knows_the_old_sampler_call_and_the_training_call():
    q, kv = torch.zeros(2, 8, 5, 64), torch.zeros(2, 2, 9, 64)
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool)
    assert cuda_kernels(q, kv, kv, attn_mask=mask, enable_gqa=True) == set(), "a mask with GQA: math"
    q2 = torch.zeros(2, 8, 9, 64)
    assert cuda_kernels(q2, kv, kv, is_causal=True, enable_gqa=True) == {"flash"}, "training: flash"
    assert cuda_kernels(q2, kv, kv, is_causal=True) == set(), "grouped heads without enable_gqa"
    folded = torch.zeros(2, 2, 20, 64)
    assert cuda_kernels(folded, kv, kv, attn_mask=torch.zeros(2, 1, 20, 9)) == {"efficient"}
    assert cuda_kernels(q2[..., :16], kv, kv, is_causal=True, enable_gqa=True) == set(), "head dims differ"


@pytest.fixture
def spy(monkeypatch):
    """Record every F.scaled_dot_product_attention call (mt/model.py calls it through the module F)."""
    calls = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((tuple(q.shape), tuple(k.shape), attn_mask is not None, is_causal,
                      cuda_kernels(q, k, v, attn_mask, is_causal, enable_gqa, dropout_p)))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return calls


@pytest.fixture
def born(monkeypatch):
    """Weak references to every model, KV cache and optimizer constructed while the test runs, each made a
    reference cycle, as an FSDP2 module is (on CPU without FSDP nothing else is one, and refcounting
    alone would free it)."""
    refs = []
    for cls in (Transformer, KVCache, PagedKVCache, torch.optim.Optimizer):
        def init(self, *a, _init=cls.__init__, **k):
            _init(self, *a, **k)
            self.__dict__["_cycle"] = [self]  # past nn.Module.__setattr__: no submodule registered
            refs.append((type(self).__name__, weakref.ref(self)))
        monkeypatch.setattr(cls, "__init__", init)
    return refs


@pytest.mark.parametrize("packing", [True, False])
def test_every_stage_attends_with_a_fused_cuda_kernel_and_frees_its_models(spy, born, tiny_llama_dir,
                                                                          tiny_rm_dir, tmp_path, packing):
    """Packed (the default) and padded: the SDPA calls here are what CUDA runs when it takes SDPA; a packed
    batch on CUDA goes to FlexAttention instead (mt/model.py segment_mask), whose mask is tested in
    tests/test_packing.py."""
    rm_dir = tiny_rm_dir  # GQA, as the policy (4 query / 2 kv heads)
    flag = str(packing).lower()
    cfg = C.parse(["--preset", "tiny", "--device", "cpu", "--dpo.packing", flag, "--rm_train.packing", flag],
                  C.StageConfig())
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt_id": f"q{i}", "prompt": q, "chosen": f"{q} Yes, fine.", "rejected": "no"}
                        for i, q in enumerate(QUESTIONS)])
    stages = {
        "sample": lambda: train_policy.sample(tiny_llama_dir, tmp_path / "prompts.jsonl", tmp_path / "s.jsonl",
                                              cfg.sampling, n=3),
        # the paged cache off CUDA: each row's blocks gathered, read like the dense cache
        "sample_paged": lambda: train_policy.sample(tiny_llama_dir, tmp_path / "prompts.jsonl", tmp_path / "p.jsonl",
                                                    replace(cfg.sampling, kv_cache="paged"), n=3),
        "score": lambda: score_file(rm_dir, tmp_path / "s.jsonl", tmp_path / "scores.jsonl", packing=packing),
        "ref_logps": lambda: train_policy.ref_logps(tiny_llama_dir, pairs, tmp_path / "ref.jsonl",
                                                    **train_policy.reference_args(cfg.dpo)),
        "dpo": lambda: train_policy.dpo(tiny_llama_dir, pairs, tmp_path / "ref.jsonl", tmp_path / "policy",
                                        cfg.dpo),
        "rm": lambda: train_rm.train(rm_dir, [pairs], tmp_path / "rm", cfg.rm_train),
    }
    seen = {}
    for name, run in stages.items():
        del spy[:], born[:]
        run()
        # no gc.collect() here: the stage collected its own cycles on return (mt/dist.py releases)
        alive = [kind for kind, ref in born if ref() is not None]
        assert born and not alive, f"{name}: still alive after the stage returned: {alive}"
        assert spy, f"{name}: no attention call recorded"
        bad = [c for c in spy if not c[4]]
        assert not bad, f"{name}: calls CUDA would run on the math kernel: {bad[:3]}"
        seen[name] = {(masked, causal) for _, _, masked, causal, _ in spy}
    # the sampler's cached forwards are masked (memory-efficient); padded, the rest is causal without a mask
    # (flash); packed, the rest is masked by documents with grouped heads folded (memory-efficient)
    assert seen["sample"] == seen["sample_paged"] == {(True, False)}
    for name in ("score", "ref_logps", "dpo", "rm"):
        assert seen[name] == ({(True, False)} if packing else {(False, True)}), name


def test_the_paged_cache_on_cuda_attends_through_flex_attention_only(spy, born, monkeypatch, tiny_llama_dir,
                                                                      tmp_path):
    """On CUDA the paged cache reads the pool through FlexAttention (mt/model.py flex_attend, compiled
    there: a Triton kernel, fused by construction, visiting only each row's blocks) and never through
    SDPA. Here FlexAttention runs uncompiled (use_flex), and every prefill and decode of the slots goes
    through it."""
    monkeypatch.setattr(PagedKVCache, "use_flex", True)
    flex, real = [], M.flex_attention
    monkeypatch.setattr(M, "flex_attention", lambda *a, **k: flex.append(a[0].shape) or real(*a, **k))
    cfg = C.parse(["--preset", "tiny", "--device", "cpu"], C.StageConfig())
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    train_policy.sample(tiny_llama_dir, tmp_path / "prompts.jsonl", tmp_path / "s.jsonl",
                        replace(cfg.sampling, kv_cache="paged", max_new_tokens=4), n=2)
    assert flex, "the paged cache's forwards through FlexAttention"
    # SDPA only for the prefix every prompt shares, prefilled once into its dense one-row cache
    assert spy and all(c[0][0] == 1 and c[4] for c in spy), spy
    assert {s[2] for s in flex} > {1}, "prefill (many queries) and decode (one) both"
    alive = [kind for kind, ref in born if ref() is not None]
    assert born and not alive, alive
