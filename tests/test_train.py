"""mt/train.py in one process: accumulation invariance, padding/prompt tokens ignored, schedules, data order,
the non-finite stop, learning on tiny runs, and checkpoints / reference log-probs against `transformers`.

Helpers here (tiny_model, random_examples, params) are imported by the other tests/test_train_*.py files.
"""
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mt.train as T
import train_policy
from conftest import hf_model
from mt import chat, dist
from mt.checkpoint import load_model, load_state_dict
from mt.config import DPOConfig, RMConfig, TrainConfig
from mt.losses import BRADLEY_TERRY, SFT, preference_objective
from mt.model import ModelConfig, Transformer

# the three trainings of the one loop, by the names the tests are parametrised with
OBJ = {"dpo": preference_objective("dpo"), "rm": BRADLEY_TERRY, "sft": SFT}

VOCAB = 64



# ---- helpers


# Tests that claim two computations are the same (micro-batch x accumulation, world sizes, FSDP or
# not, fused or full head) train in float64 (--dpo.dtype fp64): two float32 summation orders differ
# by ~1e-7 relative, and Adam can turn that into a gap one CPU's kernels stay under and another's
# do not. In float64 the gap is ~1e-15, so a tolerance of 1e-10 holds on every machine.
F64 = dict(dtype="fp64")
EXACT = 1e-10


def tiny_model(head: str = "lm", seed: int = 0, tie: bool = False,
               dtype: torch.dtype = torch.float32) -> Transformer:
    """A 2-layer Llama of hidden 32 with weights large enough that losses move (not the 0.02 init)."""
    d = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=128)
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_hf(d, head=head))
    m.init_weights(std=0.2)
    return m.to(dtype)


def random_examples(n: int, seed: int = 0, sft: bool = False) -> list[T.Example]:
    """Ragged prompts (2-6 tokens) and responses (1-6 tokens) of ids in [1, VOCAB)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return tuple(torch.randint(1, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist())
    out = []
    for i in range(n):
        x, yc, yr = ids(2, 6), ids(1, 6), ids(1, 6)
        out.append(T.Example(f"k{i}", f"p{i}", x + yc, len(x)) if sft else
                   T.Example(f"k{i}", f"p{i}", x + yc, len(x), x + yr, len(x)))
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def metrics(out_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


DPO = dict(lr=1e-3, beta=0.5, warmup_ratio=0.1, save_every=0, seed=3)


def run(objective, examples, out_dir, seed=0, **cfg):
    cls = {"dpo": DPOConfig, "rm": RMConfig, "sft": TrainConfig}[objective]
    dtype = torch.float64 if cfg.get("dtype") == "fp64" else torch.float32
    model = tiny_model("score" if objective == "rm" else "lm", seed, dtype=dtype)
    refs = train_policy.reference_logps(model, examples, 4, progress=False) if objective == "dpo" else None
    res = T.train(model, examples, OBJ[objective], cls(**cfg), out_dir, ref_logps=refs, progress=False)
    return model, res


# ---- pure pieces


def test_lr_schedule_closed_form():
    lr, total = 1.0, 20  # warmup = ceil(0.1 * 20) = 2 steps
    assert T.lr_at(0, total, lr, 0.1) == pytest.approx(1 / 3)
    assert T.lr_at(1, total, lr, 0.1) == pytest.approx(2 / 3)
    assert T.lr_at(2, total, lr, 0.1) == pytest.approx(1.0)  # cosine starts at the peak
    assert T.lr_at(11, total, lr, 0.1) == pytest.approx(0.5)  # half way through the cosine
    assert T.lr_at(19, total, lr, 0.1, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))
    assert T.lr_at(0, 5, 2.0, 0.0) == 2.0


@pytest.mark.parametrize("n, batch, micro", [(37, 8, 2), (5, 4, 1), (16, 16, 4)])
def test_data_order_independent_of_world_size(n, batch, micro):
    batches = T.global_batches(n, batch, epochs=2, seed=7)
    assert batches == T.global_batches(n, batch, epochs=2, seed=7)
    assert batches != T.global_batches(n, batch, epochs=2, seed=8)
    for e in range(2):  # each epoch is a permutation
        per_epoch = math.ceil(n / batch)
        assert sorted(i for b in batches[e * per_epoch:(e + 1) * per_epoch] for i in b) == list(range(n))
    lengths = [(i * 7) % 11 for i in range(n)]
    for b in batches:
        for world in (1, 2, 4):
            parts = [T.rank_micro_batches(b, lengths, r, world, micro) for r in range(world)]
            assert len({len(p) for p in parts}) == 1  # FSDP: the same number of forwards on every rank
            assert sorted(i for p in parts for m in p for i in m) == sorted(b)
            assert all(len(m) <= micro for p in parts for m in p)
            if len(b) == batch:  # a full batch: accumulation = batch / (micro * world), all micro-batches full
                assert all(len(p) == batch // (micro * world) and all(len(m) == micro for m in p) for p in parts)


# ---- the Must-show equalities


@pytest.mark.parametrize("objective", ["dpo", "rm", "sft"])
def test_micro8_accum1_equals_micro1_accum8(tmp_path, objective):
    """float64, 10 steps: per-step losses and parameters equal within 1e-10 (DESIGN.md §4).

    Why float64: Adam turns a near-zero gradient g summed in another order into a step of
    lr·g/(|g|+eps); in float32 that gap was 1.01e-6 on one CPU and under 1e-6 on another.
    """
    ex = random_examples(40, seed=1, sft=objective == "sft")
    cfg = dict(DPO, epochs=2, batch_size=8, **F64) if objective == "dpo" else \
        dict(lr=1e-3, epochs=2, batch_size=8, seed=3, **F64)
    m8, r8 = run(objective, ex, tmp_path / "m8", micro_batch_size=8, **cfg)
    m1, r1 = run(objective, ex, tmp_path / "m1", micro_batch_size=1, **cfg)
    assert r8.steps == r1.steps == 10
    l8, l1 = [r["loss"] for r in metrics(tmp_path / "m8")], [r["loss"] for r in metrics(tmp_path / "m1")]
    assert max(abs(a - b) for a, b in zip(l8, l1)) <= EXACT
    assert l8[-1] < l8[0] - 0.05  # it did train (otherwise equality proves little)
    p8, p1 = params(m8), params(m1)
    assert {v.dtype for v in p8.values()} == {torch.float64}
    assert max((p8[k] - p1[k]).abs().max().item() for k in p8) <= EXACT
    assert max((p8[k] - params(tiny_model(m8.cfg.head))[k]).abs().max().item() for k in p8) > 1e-2


def _loss_and_grads(model, objective, examples, cfg, side, pad_id, refs=None):
    model.zero_grad()
    batch = T.collate(examples, objective != "sft", pad_id, side=side, refs=refs)
    loss_vec, _ = OBJ[objective].step(model, batch, cfg)
    loss_vec.sum().backward()
    return loss_vec.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@torch.no_grad()
def _naive_logps(model, seq, start):
    """One unpadded sequence: sum over response tokens of log p(token | everything before it)."""
    logp = F.log_softmax(model(torch.tensor([seq])).double(), -1)[0]  # (T, V)
    return sum(logp[t - 1, seq[t]].item() for t in range(start, len(seq)))


@pytest.mark.parametrize("objective", ["dpo", "rm", "sft"])
def test_padding_and_prompt_tokens_contribute_nothing(objective):
    """Pad id and padding side change neither loss nor gradients; the loss equals an unpadded per-example loop."""
    torch.manual_seed(0)
    ex = random_examples(5, seed=2, sft=objective == "sft")
    model = tiny_model("score" if objective == "rm" else "lm", dtype=torch.float64)  # see F64
    cfg = {"dpo": DPOConfig(beta=0.5), "rm": RMConfig(), "sft": TrainConfig()}[objective]
    refs = {e.key: (-3.0 - i, -4.0 + i) for i, e in enumerate(ex)} if objective == "dpo" else None
    ref_loss, ref_grads = _loss_and_grads(model, objective, ex, cfg, "right", 0, refs)
    for side, pad in [("right", VOCAB - 1), ("left", 0), ("left", 17)]:
        loss, grads = _loss_and_grads(model, objective, ex, cfg, side, pad, refs)
        torch.testing.assert_close(loss, ref_loss, atol=EXACT, rtol=0)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=EXACT, rtol=0, msg=k)
    # a naive loop: each sequence alone, no padding, response tokens only
    if objective == "dpo":
        for e, lv in zip(ex, ref_loss):
            h = (_naive_logps(model, e.chosen, e.chosen_start) - refs[e.key][0]) - \
                (_naive_logps(model, e.rejected, e.rejected_start) - refs[e.key][1])
            assert lv.item() == pytest.approx(-F.logsigmoid(torch.tensor(0.5 * h, dtype=torch.float64)).item(), abs=EXACT)
    elif objective == "sft":
        for e, lv in zip(ex, ref_loss):
            assert lv.item() == pytest.approx(-_naive_logps(model, e.chosen, e.chosen_start), abs=EXACT)
    else:
        with torch.no_grad():
            for e, lv in zip(ex, ref_loss):
                rc, rr = (model(torch.tensor([s]))[0, -1].item() for s in (e.chosen, e.rejected))
                assert lv.item() == pytest.approx(-F.logsigmoid(torch.tensor(rc - rr, dtype=torch.float64)).item(), abs=EXACT)


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_and_pad_positions_get_exactly_zero_gradient(side):
    """The loss's gradient w.r.t. the final hidden states (what the LM head reads) is 0 wherever
    the next token is a prompt or pad token, in the fused-head step and the full-logits one."""
    ex = random_examples(4, seed=3)
    model = tiny_model()
    batch = T.collate(ex, True, 5, side=side, refs={e.key: (0.0, 0.0) for e in ex})
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["hidden"] = out
    model.model.norm.register_forward_hook(keep)
    loss, _ = OBJ["dpo"].step(model, batch, DPOConfig(beta=0.5))
    loss.sum().backward()
    g = seen["hidden"].grad.abs().sum(-1)  # (2b, T)
    model.zero_grad()
    loss, _ = preference_objective("dpo", full_logits=True).step(model, batch, DPOConfig(beta=0.5))
    loss.sum().backward()
    assert torch.equal(g == 0, seen["hidden"].grad.abs().sum(-1) == 0)
    target_is_response = torch.zeros_like(batch.loss_mask)
    target_is_response[:, :-1] = batch.loss_mask[:, 1:]  # position t predicts token t+1
    assert (g[~target_is_response] == 0).all()
    assert (g[target_is_response] > 0).all()


# ---- learning


@torch.no_grad()
def _implicit_reward_accuracy(model, examples, refs, beta):
    now = train_policy.reference_logps(model, examples, 8, progress=False)
    return sum(beta * ((now[e.key][0] - refs[e.key][0]) - (now[e.key][1] - refs[e.key][1])) > 0
               for e in examples) / len(examples)


def test_tiny_dpo_raises_implicit_reward_accuracy(tmp_path):
    ex = random_examples(16, seed=4)
    model = tiny_model()
    refs = train_policy.reference_logps(model, ex, 8, progress=False)
    assert _implicit_reward_accuracy(model, ex, refs, 0.5) == 0  # π = π_ref: every implicit reward is 0
    T.train(model, ex, OBJ["dpo"], DPOConfig(lr=1e-2, beta=0.5, batch_size=8, micro_batch_size=4, epochs=3),
            tmp_path, ref_logps=refs, progress=False)
    assert _implicit_reward_accuracy(model, ex, refs, 0.5) >= 0.9
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[-1]["loss"] < 0.3


@torch.no_grad()
def _pair_accuracy(model, examples):
    r = lambda s: model.rewards(torch.tensor([s]), lengths=torch.tensor([len(s)])).item()  # noqa: E731
    return sum(r(e.chosen) > r(e.rejected) for e in examples) / len(examples)


def test_tiny_rm_raises_pair_accuracy(tmp_path):
    ex = random_examples(16, seed=5)
    model = tiny_model("score", seed=1)
    before = _pair_accuracy(model, ex)
    T.train(model, ex, OBJ["rm"], RMConfig(lr=1e-2, batch_size=8, micro_batch_size=4, epochs=4), tmp_path, progress=False)
    after = _pair_accuracy(model, ex)
    assert before < 0.9 and after >= 0.9 and after > before


def test_sft_loss_is_token_mean_nll(tmp_path):
    """The logged loss of step 1 equals the NLL averaged over the response tokens of the whole global batch."""
    ex = random_examples(6, seed=6, sft=True)
    model = tiny_model()
    naive = [-_naive_logps(model, e.chosen, e.chosen_start) for e in ex]
    tokens = sum(len(e.chosen) - e.chosen_start for e in ex)
    T.train(model, ex, OBJ["sft"], TrainConfig(lr=1e-3, batch_size=6, micro_batch_size=2), tmp_path, progress=False)
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(sum(naive) / tokens, abs=1e-5)


# ---- the non-finite stop (one process; the two-rank version is in test_train_dist.py)


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    ex = random_examples(16, seed=7)
    model = tiny_model()
    refs = train_policy.reference_logps(model, ex, 8, progress=False)
    calls = {"n": 0}
    real = OBJ["dpo"].step

    def nan_at_step_3(model, batch, cfg):
        calls["n"] += 1
        loss, m = real(model, batch, cfg)
        return (loss * float("nan") if calls["n"] == 3 else loss), m
    nan_objective = dataclasses.replace(OBJ["dpo"], step=nan_at_step_3)
    cfg = DPOConfig(lr=1e-2, beta=0.5, batch_size=4, micro_batch_size=4, save_every=2)
    seen = {}
    real_fail = T._fail

    def spy(*a):  # the weights when the error is raised, before anything could touch them
        seen["params"] = params(model)
        real_fail(*a)
    monkeypatch.setattr(T, "_fail", spy)
    with pytest.raises(T.NonFiniteError, match=r"step 3/4 .*non-finite loss.*prompt_ids"):
        T.train(model, ex, nan_objective, cfg, tmp_path, ref_logps=refs, progress=False)
    ckpt = tmp_path / "ckpt-2" / "model.safetensors"
    saved = load_state_dict(tmp_path / "ckpt-2")
    assert all(torch.equal(seen["params"][k], saved[k]) for k in saved)  # no update after step 2
    assert all(torch.equal(params(model)[k], saved[k]) for k in saved)
    assert json.loads((tmp_path / "trainer_state" / "meta.json").read_text())["step"] == 2
    assert not (tmp_path / "ckpt-3").exists() and not (tmp_path / "final").exists()
    h = sha(ckpt)
    assert len(metrics(tmp_path)) == 2 and sha(ckpt) == h


# ---- against transformers: examples, reference log-probs, saved checkpoints


def _pairs(n=6):
    words = ["the sea is blue", "two plus two is four", "hello world", "the quick brown fox jumps", "fine, thank you"]
    return [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": words[i % 5] + "?"}],
             "chosen": words[(i + 1) % 5] * (1 + i % 2), "rejected": words[(i + 3) % 5]} for i in range(n)]


def test_policy_examples_drop_long_pairs_and_never_truncate(tiny_llama_dir):
    from mt.chat import encode_prompt, encode_response, load_tokenizer
    tok = load_tokenizer(tiny_llama_dir)
    pairs = _pairs()
    full, dropped = chat.policy_examples(tok, pairs, 10_000)
    assert dropped == 0 and len(full) == len(pairs)
    limit = sorted(max(len(e.chosen), len(e.rejected)) for e in full)[3]
    kept, dropped = chat.policy_examples(tok, pairs, limit)
    assert dropped == sum(max(len(e.chosen), len(e.rejected)) > limit for e in full) and dropped > 0
    assert len(kept) + dropped == len(pairs)
    by_id = {p["prompt_id"]: p for p in pairs}
    for e in kept:
        p = by_id[e.prompt_id]
        x = encode_prompt(tok, p["prompt"])
        assert list(e.chosen) == x + encode_response(tok, p["chosen"]) and e.chosen_start == len(x)
        assert list(e.rejected) == x + encode_response(tok, p["rejected"])
        assert e.key == chat.pair_id(p["prompt_id"], p["chosen"], p["rejected"])
    rm_kept, rm_dropped = chat.rm_examples(tok, pairs, 10_000)
    assert rm_dropped == 0 and len(rm_kept) == len(pairs)


@torch.no_grad()
def test_reference_logps_equal_a_transformers_forward(tiny_llama_dir, tmp_path):
    from mt.chat import load_tokenizer
    tok = load_tokenizer(tiny_llama_dir)
    ex, _ = chat.policy_examples(tok, _pairs(), 10_000)
    ours = train_policy.reference_logps(load_model(tiny_llama_dir), ex, 4, pad_id=tok.pad_token_id, progress=False)
    hf = hf_model(tiny_llama_dir)
    for e in ex:
        for seq, start, got in ((e.chosen, e.chosen_start, ours[e.key][0]), (e.rejected, e.rejected_start, ours[e.key][1])):
            logp = F.log_softmax(hf(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            want = sum(logp[t - 1, seq[t]].item() for t in range(start, len(seq)))
            assert got == pytest.approx(want, abs=1e-4)
    train_policy.write_ref_logps(tmp_path / "ref.jsonl", ex, ours, tiny_llama_dir)
    back = train_policy.read_ref_logps(tmp_path / "ref.jsonl", ex)
    assert back.keys() == ours.keys()  # pytest.approx takes no nested dicts: compare pair by pair
    for key, (c, r) in ours.items():
        assert back[key] == pytest.approx((c, r))
    with pytest.raises(T.TrainError, match="no reference log-probs for pair"):
        train_policy.read_ref_logps(tmp_path / "ref.jsonl", ex + [T.Example("zzz", "p9", (1, 2), 1, (1, 3), 1)])


def test_dpo_checkpoints_load_in_transformers_with_the_same_logits(tiny_llama_dir, tmp_path):
    from mt.chat import load_tokenizer
    tok = load_tokenizer(tiny_llama_dir)
    ex, _ = chat.policy_examples(tok, _pairs(), 10_000)
    model = load_model(tiny_llama_dir)
    refs = train_policy.reference_logps(model, ex, 4, progress=False)
    res = T.train(model, ex, OBJ["dpo"], DPOConfig(lr=1e-3, beta=0.1, batch_size=2, micro_batch_size=1, save_every=2),
                  tmp_path, ref_logps=refs, tokenizer_dir=tiny_llama_dir, progress=False)
    assert [c.name for c in res.checkpoints] == ["ckpt-2"] and res.final == tmp_path / "final"
    assert (tmp_path / "final" / "tokenizer.json").is_file() and (tmp_path / "final" / "generation_config.json").is_file()
    ids = torch.tensor([list(ex[0].chosen)])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "final")(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        before = load_model(tiny_llama_dir)(ids)
        assert (hf_model(tmp_path / "ckpt-2")(input_ids=ids).logits - before).abs().max() > 1e-4  # it moved


def test_rm_checkpoints_load_in_transformers_with_the_same_scores(tiny_llama_dir, tiny_rm_dir, tmp_path):
    """train_rm.train from an RM and from a causal LM (fresh score head): --out is an HF sequence classifier."""
    import train_rm
    from mt.data import write_jsonl
    from mt.scoring import score_conversations
    pairs = _pairs()
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = RMConfig(lr=1e-3, batch_size=2, micro_batch_size=2)
    for init in (tiny_rm_dir, tiny_llama_dir):
        out = tmp_path / f"rm-{init.name}"
        info = train_rm.train(init, [tmp_path / "pairs.jsonl"], out, cfg)
        assert info["steps"] == 3 and info["pairs"] == 6 and 0 <= info["train_acc"] <= 1
        assert (out / "final" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
        hf = hf_model(out / "final", "score")
        from mt.chat import encode_conversation, load_tokenizer
        tok = load_tokenizer(out / "final")
        items = [(p["prompt"], p["chosen"]) for p in pairs]
        ours = score_conversations(out / "final", items, progress=False)
        with torch.no_grad():
            for (msgs, y), s in zip(items, ours):
                ids = torch.tensor([encode_conversation(tok, msgs, y)])
                # the score head at the last token (transformers' own pooling searches for the pad id, which
                # here equals the end-of-turn token that ends the chat: DESIGN.md §4's pitfall)
                per_token = hf.score(hf.model(input_ids=ids).last_hidden_state)[0, :, 0]
                assert per_token[-1].item() == pytest.approx(s, abs=1e-5)
        # a rerun finds the finished run and does not train again
        mtime = (out / "final" / "model.safetensors").stat().st_mtime_ns
        train_rm.train(init, [tmp_path / "pairs.jsonl"], out, cfg)
        assert (out / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    assert train_rm.pair_accuracy(out / "final", tmp_path / "pairs.jsonl") in {i / 6 for i in range(7)}


def test_config_errors_name_the_fix(tmp_path):
    ex = random_examples(4)
    with pytest.raises(T.TrainError, match=r"batch_size=6 must be a multiple of micro_batch_size \(4\)"):
        T.train(tiny_model(), ex, OBJ["dpo"], DPOConfig(batch_size=6, micro_batch_size=4), tmp_path, ref_logps={})
    with pytest.raises(T.TrainError, match="needs reference log-probs"):
        T.train(tiny_model(), ex, OBJ["dpo"], DPOConfig(batch_size=4, micro_batch_size=4), tmp_path)
    with pytest.raises(T.TrainError, match="objective='ppo'"):
        T.train(tiny_model(), ex, "ppo", DPOConfig(), tmp_path)
    run("rm", ex, tmp_path / "a", batch_size=4, micro_batch_size=4)
    with pytest.raises(T.TrainError, match="belongs to another run"):
        run("rm", random_examples(4, seed=9), tmp_path / "a", batch_size=4, micro_batch_size=4)


# ---- the GPU code path (FSDP2 in one process, bf16 mixed precision), exercised on CPU with gloo


@pytest.mark.parametrize("dtype", ["fp64", "fp32", "bf16"])
def test_fsdp_single_process_and_bf16_mixed_precision(tmp_path, dtype):
    """fsdp=True with one process is what plain `python train_policy.py` does on one GPU: it equals the
    unsharded run (in fp64, see F64); fp32 and bf16 keep fp32 master weights, bf16 computes in bf16 and
    saves bf16 checkpoints."""
    import torch.distributed as tdist
    ex = random_examples(12, seed=8)
    master = torch.float64 if dtype == "fp64" else torch.float32
    cfg = DPOConfig(lr=1e-3, beta=0.5, batch_size=4, micro_batch_size=2, dtype=dtype)
    plain = tiny_model(dtype=master)
    refs = train_policy.reference_logps(plain, ex, 4, progress=False)
    plain_dtype = "fp64" if dtype == "fp64" else "fp32"
    T.train(plain, ex, OBJ["dpo"], DPOConfig(**{**cfg.__dict__, "dtype": plain_dtype}), tmp_path / "plain",
            ref_logps=refs, progress=False)
    try:
        sharded = tiny_model(dtype=master)
        res = T.train(sharded, ex, OBJ["dpo"], cfg, tmp_path / "fsdp", ref_logps=refs, fsdp=True, progress=False)
        assert dist.is_sharded(sharded) and all(p.dtype == master for p in sharded.parameters())
    finally:
        tdist.destroy_process_group()
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "fsdp")
    # fp64: the same computation (EXACT); fp32: float32 is what is under test here (its master weights and
    # checkpoints), so a float32 tolerance well above its summation-order noise; bf16: bf16 compute
    tol = {"fp64": EXACT, "fp32": 1e-4, "bf16": 3e-2}[dtype]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= tol
    if dtype == "bf16":  # the policy really computed in bf16 (its step-1 log-probs differ from the fp32 refs)
        assert b[0]["loss"] != a[0]["loss"]
    saved = load_state_dict(res.final)
    assert {v.dtype for v in saved.values()} == {{"bf16": torch.bfloat16}.get(dtype, master)}


def test_fsdp_fused_head_with_tied_embeddings(tmp_path):
    """The fused head reads lm_head.weight after the root forward (mt/logps.py _lm_head_weight):
    under FSDP2 with the head tied to the embeddings, training equals the plain run, and the full
    logits path and the padded layout equal both."""
    import torch.distributed as tdist
    ex = random_examples(8, seed=10)
    cfg = DPOConfig(lr=1e-2, beta=0.5, batch_size=4, micro_batch_size=2, **F64)
    refs = train_policy.reference_logps(tiny_model(tie=True, dtype=torch.float64), ex, 4, progress=False)
    runs = {}
    try:
        for name, fsdp, full, packing in (("plain", False, False, True), ("fsdp", True, False, True),
                                          ("full", True, True, True), ("padded", True, False, False)):
            model = tiny_model(tie=True, dtype=torch.float64)
            T.train(model, ex, preference_objective("dpo", full_logits=full),
                    dataclasses.replace(cfg, packing=packing), tmp_path / name, ref_logps=refs, fsdp=fsdp,
                    progress=False)
            runs[name] = [r["loss"] for r in metrics(tmp_path / name)]
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    assert len(runs["plain"]) == 2 and runs["plain"][1] != runs["plain"][0]
    assert runs["fsdp"] == pytest.approx(runs["plain"], abs=EXACT)
    assert runs["full"] == pytest.approx(runs["plain"], abs=EXACT)
    assert runs["padded"] == pytest.approx(runs["plain"], abs=EXACT)  # FSDP padded == plain packed


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, monkeypatch):
    import mt.model as M
    ex = random_examples(12, seed=9)
    got = {}
    mlp_forward = M.MLP.forward
    calls = []

    def counted(self, x):  # (module hooks do not fire during checkpoint's recompute; a patched forward does)
        calls.append(1)
        return mlp_forward(self, x)
    monkeypatch.setattr(M.MLP, "forward", counted)
    for ac in (False, True):
        model = tiny_model()
        refs = train_policy.reference_logps(model, ex, 4, progress=False)
        calls.clear()
        T.train(model, ex, OBJ["dpo"], DPOConfig(lr=1e-3, beta=0.5, batch_size=4, micro_batch_size=2,
                                            activation_checkpointing=ac), tmp_path / str(ac), ref_logps=refs,
                progress=False)
        got[ac] = (metrics(tmp_path / str(ac)), params(model), len(calls))
    assert [r["loss"] for r in got[True][0]] == [r["loss"] for r in got[False][0]]
    assert got[True][1].keys() == got[False][1].keys()  # Hugging Face names kept (no wrapper module)
    assert all(torch.equal(got[True][1][k], got[False][1][k]) for k in got[True][1])
    assert got[True][2] == 2 * got[False][2] == 2 * 6 * 2  # 6 micro-batches × 2 blocks, recomputed in backward
