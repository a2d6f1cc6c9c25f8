"""mt/packing.py against the padded layout (the reference): the same per-example log-probs, rewards, losses
and gradients for every objective, the reference pass and scoring, tied and untied heads, the prompt once
per pair or not; the same model after N steps; the layout itself (positions, masks, budgets); and the
CUDA backend's block mask (FlexAttention, run eagerly here) against the CPU one. float64 and 1e-10, as
tests/test_train.py explains (F64)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import mt.model as M
import mt.train as T
import train_policy
from mt import packing as P
from mt.chat import Example
from mt.config import DPOConfig, RMConfig, TrainConfig
from mt.losses import preference_objective
from mt.scoring import load_rm, score_conversations
from test_train import EXACT, F64, OBJ, metrics, params, random_examples, tiny_model

CFG = {"dpo": DPOConfig(beta=0.5), "simpo": DPOConfig(beta=2.0, loss="simpo"), "rm": RMConfig(margin=0.1),
       "sft": TrainConfig()}


def _objective(name):
    return preference_objective("simpo") if name == "simpo" else OBJ[name]


def _shared_prompt_examples(n, seed):
    """Pairs whose responses also begin alike (the shared prefix then runs past the prompt), one pair of
    identical sequences, and one where the chosen is a prefix of the rejected."""
    ex = random_examples(n, seed=seed)
    e = ex[0]
    ex[0] = Example(e.key, e.prompt_id, e.chosen, e.chosen_start, e.chosen[:e.chosen_start + 1] + (7, 8),
                    e.chosen_start)
    ex[1] = Example("same", "p", ex[1].chosen, ex[1].chosen_start, ex[1].chosen, ex[1].chosen_start)
    ex[2] = Example("pre", "p", ex[2].chosen, ex[2].chosen_start, ex[2].chosen + (3, 4), ex[2].chosen_start)
    return ex


def _step(model, objective, batch, cfg):
    model.zero_grad()
    loss, m = _objective(objective).step(model, batch, cfg)
    loss.sum().backward()
    return loss.detach(), m, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ---- the layout


def test_documents_positions_and_targets():
    e = Example("k", "p", (5, 6, 7, 8, 9), 3, (5, 6, 7, 11), 3)  # prompt 5 6 7; responses 8 9 | 11
    pk = P.pack([e], True, share_prompt=True)
    assert pk.ids.tolist() == [[5, 6, 7, 8, 9, 11]]
    assert pk.positions.tolist() == [[0, 1, 2, 3, 4, 3]]  # the rejected branch restarts at the prompt's length
    assert pk.branch.tolist() == [[0, 0, 0, 1, 1, 2]]
    # chosen's 8, 9 predicted at positions 2, 3; rejected's 11 by the prompt's last token (2), not by 9
    assert list(zip(pk.pred.tolist(), pk.targets.tolist(), pk.owner.tolist())) == [(2, 8, 0), (3, 9, 0), (2, 11, 1)]
    assert pk.last.tolist() == [4, 5] and pk.tokens == 6 and pk.slots == 6
    apart = P.pack([e], True, share_prompt=False)
    assert apart.ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 11, 0]] and apart.doc[1, -1] == -1
    assert apart.positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0]]
    # documents share a row when they fit: positions restart at each one
    two = P.pack([Example("a", "p", (1, 2, 3), 1), Example("b", "p", (4, 5), 1), Example("c", "p", (6,), 1)],
                 False)
    assert two.ids.tolist() == [[1, 2, 3], [4, 5, 6]] and two.positions.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert P.shared_prefix(Example("s", "p", (1, 2), 1, (1, 2), 1)) == 1  # each branch keeps its last token


def test_segment_mask_against_a_naive_rule():
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 2, -1, -1]])
    branch = torch.tensor([[0, 0, 1, 2, 0, 0, 0], [0, 1, 1, 2, 2, 0, 0]])
    bias = M.segment_mask(doc, branch, 1, torch.float64)
    R, W = doc.shape
    for b in range(R):
        for q in range(W):
            for k in range(W):
                want = (k <= q and doc[b, q] == doc[b, k]
                        and (branch[b, k] == 0 or branch[b, k] == branch[b, q]))
                assert (bias[b, 0, q, k] == 0) == want, (b, q, k)
    folded = M.segment_mask(doc, branch, 2, torch.float64)  # grouped heads: queries repeated per head
    assert torch.equal(folded[:, :, :W], bias) and torch.equal(folded[:, :, W:], bias)


EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@EAGER_FLEX
def test_flex_block_mask_equals_the_folded_sdpa_mask():
    """The CUDA backend (FlexAttention, block mask) and the CPU one (SDPA, additive folded mask) give the
    same attention on a packed batch with a shared prompt; flex runs eagerly here (no compile on CPU)."""
    ex = _shared_prompt_examples(5, seed=3)
    pk = P.pack(ex, True, share_prompt=True)
    torch.manual_seed(0)
    R, W = pk.ids.shape
    q, kv = torch.randn(R, 4, W, 8, dtype=torch.float64), torch.randn(2, R, 2, W, 8, dtype=torch.float64)
    block = M.segment_mask(pk.doc, pk.branch, 2, torch.float64, flex=True)
    got = flex_attention(q, kv[0], kv[1], block_mask=block, enable_gqa=True)
    bias = M.segment_mask(pk.doc, pk.branch, 2, torch.float64, flex=False)
    want = F.scaled_dot_product_attention(q.reshape(R, 2, 2 * W, 8), kv[0], kv[1], attn_mask=bias).reshape(R, 4, W, 8)
    torch.testing.assert_close(got, want, atol=EXACT, rtol=0)


@EAGER_FLEX
@torch.no_grad()
def test_flex_path_of_the_model_equals_the_padded_forward(monkeypatch):
    """Attention's FlexAttention branch, forced on CPU (eager flex): per-example log-probs and rewards
    equal the padded path's."""
    real = M.segment_mask
    monkeypatch.setattr(M, "segment_mask", lambda doc, branch, rep, dtype, flex=None: real(doc, branch, rep, dtype, True))
    ex = _shared_prompt_examples(4, seed=4)
    pk, padded = P.pack(ex, True, share_prompt=True, one_row=True, align=128), T.collate(ex, True)  # as on CUDA
    lm, rm = tiny_model(dtype=torch.float64), tiny_model("score", dtype=torch.float64)
    torch.testing.assert_close(pk.logps(lm), padded.logps(lm), atol=EXACT, rtol=0)
    torch.testing.assert_close(pk.rewards(rm), padded.rewards(rm), atol=EXACT, rtol=0)


@pytest.mark.parametrize("per_example", [1, 2])  # one document per example (shared prompt, SFT) or two
def test_micro_batches_by_a_token_budget_the_same_count_on_every_rank(per_example):
    docs = [[(i * 37 + j * 11) % 23 + 2 for j in range(per_example)] for i in range(40)]
    batch = list(range(3, 33))
    for world in (1, 2, 3):
        for budget in (48, 120):
            parts = [P.micro_batches(batch, docs, r, world, budget) for r in range(world)]
            assert len({len(p) for p in parts}) == 1  # FSDP: as many forwards on every rank
            assert sorted(i for p in parts for m in p for i in m) == sorted(batch)
            for r, p in enumerate(parts):
                assert sorted(i for m in p for i in m) == sorted(batch[r::world])  # the padded path's share
                filled = [m for m in p if m]
                assert p[:len(filled)] == filled  # a rank's empty micro-batches come last
                for m in p:
                    assert sum(sum(docs[i]) for i in m) <= budget
                    if per_example == 1 and m:  # the rows pack() lays out fit the budget too
                        assert P.pack([Example(str(i), "p", (1,) * docs[i][0], 1) for i in m], False).slots <= budget
    assert P.micro_batches([0, 1], [[50], [3]], 0, 1, 10) == [[0], [1]]  # over the budget: alone
    assert P.micro_batches([0, 1], [[10, 9], [3, 2]], 0, 1, 10) == [[0], [1]]  # a pair over one row: alone


# ---- exactness: one micro-batch, packed == padded


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("share, one_row", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("objective", ["dpo", "simpo", "rm", "sft"])
def test_packed_step_equals_padded_step(objective, share, one_row, tie):
    """Per-example loss, every metric, and every gradient; rows as wide as the longest document (CPU)
    or one row (CUDA's layout)."""
    sft = objective == "sft"
    ex = random_examples(6, seed=1, sft=True) if sft else _shared_prompt_examples(6, seed=1)
    model = tiny_model("score" if objective == "rm" else "lm", tie=tie and objective != "rm", dtype=torch.float64)
    refs = {e.key: (-3.0 - i, -4.0 + i) for i, e in enumerate(ex)}
    want = _step(model, objective, T.collate(ex, not sft, 0, refs=refs), CFG[objective])
    pk = P.pack(ex, not sft, share, pad_id=9, refs=refs, one_row=one_row, align=8 if one_row else 1)
    assert pk.ids.shape[0] == 1 if one_row else pk.ids.shape[0] > 1
    assert pk.slots - pk.tokens <= T.collate(ex, not sft).ids.numel() - pk.tokens  # never more padding
    got = _step(model, objective, pk, CFG[objective])
    torch.testing.assert_close(got[0], want[0], atol=EXACT, rtol=0)
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        # `correct` is a step at a tie (the pair of identical sequences): compare it off ties
        off_tie = want[1]["margin"].abs() > EXACT if k == "correct" else slice(None)
        torch.testing.assert_close(got[1][k][off_tie], want[1][k][off_tie], atol=EXACT, rtol=0, msg=k)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], atol=EXACT, rtol=0, msg=k)
    assert max(g.abs().max().item() for g in want[2].values()) > 1e-3  # gradients that could differ


def test_a_wrong_position_would_be_caught():
    """The equality above is not vacuous: rejected positions that do not restart at the prompt's length
    change the log-probs."""
    ex = random_examples(3, seed=2)
    model = tiny_model(dtype=torch.float64)
    pk = P.pack(ex, True, share_prompt=True)
    good = pk.logps(model)
    pk.positions = torch.where(pk.branch == P.REJECTED, pk.positions + 1, pk.positions)
    assert (pk.logps(model) - good).abs().max() > 1e-3


@pytest.mark.parametrize("share", [True, False])
def test_reference_pass_packed_equals_padded(share):
    ex = _shared_prompt_examples(9, seed=5)
    model = tiny_model(tie=True, dtype=torch.float64)
    want = train_policy.reference_logps(model, ex, 2, packing=False, progress=False)
    got = train_policy.reference_logps(model, ex, 2, packing=True, share_prompt=share, progress=False)
    full = train_policy.reference_logps(model, ex, 2, packing=True, share_prompt=share, full_logits=True,
                                        progress=False)
    assert got.keys() == want.keys() == full.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=EXACT) and full[k] == pytest.approx(want[k], abs=EXACT)


def test_scoring_packed_equals_padded(tiny_rm_dir):
    rm, tok = load_rm(tiny_rm_dir, "cpu", "fp64")
    items = [([{"role": "user", "content": f"question {i} " * (1 + i % 4)}], "an answer " * (i % 5) + str(i))
             for i in range(11)]
    want = score_conversations(rm, items, tok, batch_size=3, progress=False, packing=False)
    got = score_conversations(rm, items, tok, max_tokens=80, progress=False)  # several packed batches
    assert got == pytest.approx(want, abs=EXACT) and len(set(want)) == len(want)


# ---- exactness: N steps of the loop, packed (micro-batches by tokens) == padded


@pytest.mark.parametrize("objective, share", [("dpo", True), ("dpo", False), ("rm", True), ("sft", False)])
def test_training_packed_equals_padded_after_n_steps(tmp_path, objective, share):
    sft = objective == "sft"
    ex = random_examples(20, seed=6, sft=sft) if sft else _shared_prompt_examples(20, seed=6)
    cls = {"dpo": DPOConfig, "rm": RMConfig, "sft": TrainConfig}[objective]
    extra = dict(beta=0.5) if objective == "dpo" else {}
    runs = {}
    for name, packing in (("padded", False), ("packed", True)):
        model = tiny_model("score" if objective == "rm" else "lm", seed=1, dtype=torch.float64)
        refs = (train_policy.reference_logps(model, ex, 4, packing=packing, progress=False)
                if objective == "dpo" else None)
        cfg = cls(lr=1e-2, batch_size=8, micro_batch_size=2, epochs=2, seed=4, packing=packing,
                  share_prompt=share, micro_batch_tokens=40 if packing else 0, **extra, **F64)
        T.train(model, ex, OBJ[objective], cfg, tmp_path / name, ref_logps=refs, progress=False)
        runs[name] = (metrics(tmp_path / name), params(model))
    (a, pa), (b, pb) = runs["padded"], runs["packed"]
    assert len(a) == len(b) == 6
    for k in ("loss", "grad_norm"):
        assert max(abs(x[k] - y[k]) for x, y in zip(a, b)) <= EXACT, k
    assert a[-1]["loss"] < a[0]["loss"]  # it trained
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= EXACT
    assert [x["tokens"] for x in a] == [y["tokens"] for y in b]  # real tokens, whatever the layout
    # pad_fraction: the padding among the positions each step computed, counted here from the layouts
    sizes = dict(pairwise=not sft, micro_batch_size=2)
    for rows, layout in ((a, T.Padded(ex, **sizes)), (b, P.Packing(ex, share_prompt=share, budget=40, **sizes))):
        for row, idx in zip(rows, T.global_batches(len(ex), 8, 2, 4)):
            batches = [layout.batch([ex[i] for i in m]) for m in layout.micro(idx, 0, 1)]
            slots = sum(x.slots for x in batches)
            assert row["pad_fraction"] == round((slots - sum(int(x.tokens) for x in batches)) / slots, 4)
    assert min(x["pad_fraction"] for x in a) > 0.01  # the data are ragged: every padded step pads


def test_benchmark_lengths_follow_the_stated_spread():
    """eval/bench_train.py --lengths ultrafeedback: pairs within --seq sharing their prompt, with the
    medians SPREAD states (scaled by seq / 2048); a pad-free fixed-length builder would fail this."""
    from eval.bench_train import SPREAD, spread_examples
    ex = spread_examples(400, 1024, 100)
    scale = 1024 / SPREAD["cap"]
    assert all(max(len(e.chosen), len(e.rejected)) <= 1024 and e.chosen[:e.chosen_start] == e.rejected[:e.chosen_start]
               for e in ex)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert med([e.chosen_start for e in ex]) == pytest.approx(SPREAD["prompt"][0] * scale, rel=0.2)
    assert med([len(e.chosen) - e.chosen_start for e in ex]) == pytest.approx(SPREAD["response"][0] * scale, rel=0.2)
    assert max(len(e.rejected) for e in ex) > 4 * min(len(e.rejected) for e in ex)  # a spread, not a constant
