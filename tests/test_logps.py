"""mt/logps.py against a naive per-token loop, the full-logits path, and autograd's numerical gradients."""
import pytest
import torch
import torch.nn.functional as F

from mt import logps
from mt.logps import sequence_logps

f64 = dict(dtype=torch.float64)


# ---- sequence_logps vs a naive per-token loop

def ragged_batch(B=3, T=9, V=13, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(B, T, V, **f64) * 3
    labels = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, end) in enumerate([(3, 9), (5, 7), (2, 2)]):  # prompt | response | padding; row 2 empty
        mask[b, start:end] = True
    labels[~mask] = -100  # pad / prompt labels must not be looked up
    return logits, labels, mask


def naive_logps(logits, labels, mask, average=False):
    out = []
    for b in range(logits.shape[0]):
        terms = [F.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]]
                 for t in range(1, logits.shape[1]) if mask[b, t]]
        s = sum(terms, torch.tensor(0.0, **f64))
        out.append(s / max(len(terms), 1) if average else s)
    return torch.stack(out)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_naive_loop(average, monkeypatch):
    logits, labels, mask = ragged_batch()
    want = naive_logps(logits, labels, mask, average)
    torch.testing.assert_close(sequence_logps(logits, labels, mask, average), want)
    assert want[2] == 0  # a row without response tokens
    monkeypatch.setattr(logps, "_CHUNK_ELEMS", 2 * logits.shape[-1])  # many chunks of 2 rows
    torch.testing.assert_close(sequence_logps(logits, labels, mask, average), want)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_gradcheck(average, monkeypatch):
    monkeypatch.setattr(logps, "_CHUNK_ELEMS", 3 * 13)  # exercise the chunked backward too
    logits, labels, mask = ragged_batch()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, labels, mask, average), (logits,))


def test_sequence_logps_bf16_logits_computed_in_fp32():
    logits, labels, mask = ragged_batch()
    x16 = logits.bfloat16().requires_grad_(True)
    out = sequence_logps(x16, labels, mask)
    assert out.dtype == torch.float32
    # Same bf16 values, exact arithmetic: only fp32 rounding apart.
    x64 = x16.detach().double().requires_grad_(True)
    want = naive_logps(x64, labels, mask)
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-6, atol=1e-5)
    # Against the original fp32 logits: bf16 input rounding only.
    torch.testing.assert_close(out.double(), naive_logps(logits, labels, mask), rtol=2e-2, atol=5e-2)
    out.sum().backward()
    want.sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad.double(), x64.grad, rtol=1e-2, atol=1e-2)


def test_masked_positions_contribute_nothing():
    logits, labels, mask = ragged_batch()
    # Position t predicts token t+1: it counts only if token t+1 is a response token.
    predicts = torch.zeros_like(mask)
    predicts[:, :-1] = mask[:, 1:]

    def value_and_grad(x, y):
        x = x.clone().requires_grad_(True)
        out = sequence_logps(x, y, mask)
        out.sum().backward()
        return out.detach(), x.grad

    v0, g0 = value_and_grad(logits, labels)
    torch.manual_seed(1)
    logits2 = torch.where(predicts[..., None], logits, 1e3 * torch.randn_like(logits))
    labels2 = torch.where(mask, labels, torch.randint(0, 13, labels.shape))
    v1, g1 = value_and_grad(logits2, labels2)
    torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    assert (g0[~predicts] == 0).all() and (g0[predicts] != 0).any()


def test_sequence_logps_without_grad():  # the frozen reference runs under no_grad
    logits, labels, mask = ragged_batch()
    with torch.no_grad():
        out = sequence_logps(logits.float(), labels, mask)
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), naive_logps(logits.float(), labels, mask), rtol=1e-5, atol=1e-5)


def test_no_fp32_copy_of_logits_kept_for_backward():
    logits, labels, mask = ragged_batch(T=9, V=13)
    x16 = logits.bfloat16().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sequence_logps(x16, labels, mask)
    big = [t for t in saved if t.numel() >= x16.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big)  # only the bf16 logits themselves
    out.sum().backward()
    # What a plain `logits.float().logsumexp(-1)` would keep, for contrast: the test can tell them apart.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x16.float().logsumexp(-1)
    assert any(t.dtype == torch.float32 and t.numel() >= x16.numel() for t in saved)


# ---- the fused head (response_logps) against the full-logits path it replaces

def _tiny_lm(tie=False, seed=0, vocab=50):
    from mt.model import ModelConfig, Transformer
    d = dict(model_type="llama", vocab_size=vocab, hidden_size=16, intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=tie, max_position_embeddings=64)
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_hf(d))
    m.init_weights(std=0.3)
    return m


def _fused_batch(side, vocab=50, seed=1):
    """4 rows of prompt | response | padding (one row without a response), right or left padded."""
    g = torch.Generator().manual_seed(seed)
    rows = [(3, 6), (2, 9), (5, 0), (1, 4)]  # (prompt, response) lengths
    T = max(p + r for p, r in rows) + 1
    ids = torch.randint(1, vocab, (len(rows), T), generator=g)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        off = T - p - r if side == "left" else 0
        mask[b, off + p:off + p + r] = True
        am[b, off:off + p + r] = 1
    ids[am == 0] = 0
    return ids, mask, (am if side == "left" else None)


def _value_and_grads(model, ids, mask, am, average, full):
    model.zero_grad()
    out = logps.response_logps(model, ids, mask, am, average, full_logits=full)
    (out * torch.linspace(0.5, 2.0, out.numel())).sum().backward()  # a different weight per row
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])  # None: one vocabulary block; 7: many, ragged last
def test_fused_head_equals_full_logits(tie, side, average, chunk, monkeypatch):
    """Log-probs and every parameter's gradient (tied head and embeddings included) equal the
    full-logits path to 1e-10 in float64 (two summation orders of the same numbers: float32's own
    rounding of these ~40-nat sums is ~5e-6, too close to any tolerance that holds on every CPU)."""
    model = _tiny_lm(tie).double()
    ids, mask, am = _fused_batch(side)
    want, want_g = _value_and_grads(model, ids, mask, am, average, True)
    if chunk:
        N = int(mask[:, 1:].sum())
        monkeypatch.setattr(logps, "_CHUNK_ELEMS", chunk * N)  # blocks of 7 of the 50 columns
    got, got_g = _value_and_grads(model, ids, mask, am, average, False)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert got[2] == 0 and want[2] == 0  # the row without a response
    assert got_g.keys() == want_g.keys() and (tie == ("lm_head.weight" not in got_g))
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=0, atol=1e-10, msg=k)
    with torch.no_grad():  # the reference pass: no graph, same values
        ref = logps.response_logps(model, ids, mask, am, average)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-10)


def test_fused_head_gradcheck(monkeypatch):
    monkeypatch.setattr(logps, "_CHUNK_ELEMS", 5 * 6)  # 6 rows: blocks of 5 of 13 columns
    torch.manual_seed(0)
    h = torch.randn(6, 4, **f64, requires_grad=True)
    w = torch.randn(13, 4, **f64, requires_grad=True)
    y = torch.tensor([0, 4, 5, 12, 9, 10])
    assert torch.autograd.gradcheck(lambda a, b: logps._HeadTokenLogps.apply(a, b, y), (h, w))
    want = F.log_softmax(h @ w.T, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(logps._HeadTokenLogps.apply(h, w, y), want)


def test_fused_head_never_holds_full_logits_and_skips_prompt_positions():
    """Nothing of (B, T, V) (or (N, V)) is saved for backward, the head sees response positions
    only, and the hidden states of prompt and pad positions get exactly zero gradient."""
    V = 50
    model = _tiny_lm(vocab=V)
    ids, mask, _ = _fused_batch("right", vocab=V)
    N = int(mask[:, 1:].sum())
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["hidden"] = out
    model.model.norm.register_forward_hook(keep)
    model.lm_head.register_forward_hook(lambda *a: seen.setdefault("lm_head called", True))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = logps.response_logps(model, ids, mask)
    weights = {p.data_ptr() for p in model.parameters()}  # the (V, C) head and embeddings
    assert saved and not any(V in t.shape for t in saved if t.data_ptr() not in weights)
    assert any(t.shape == (N, 16) for t in saved)  # the response rows' hidden states
    assert "lm_head called" not in seen
    out.sum().backward()
    g = seen["hidden"].grad.abs().sum(-1)  # (B, T)
    predicts = torch.zeros_like(mask)
    predicts[:, :-1] = mask[:, 1:]
    assert (g[~predicts] == 0).all() and (g[predicts] > 0).all()


def test_fused_head_bf16_close_to_full_logits():
    """In bf16 the logits are rounded as the full path rounds them; only the hidden-state
    gradient's per-block sums differ in rounding."""
    model = _tiny_lm(seed=2).to(torch.bfloat16)
    ids, mask, _ = _fused_batch("right")
    want, want_g = _value_and_grads(model, ids, mask, None, False, True)
    got, got_g = _value_and_grads(model, ids, mask, None, False, False)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for k in want_g:
        torch.testing.assert_close(got_g[k].float(), want_g[k].float(), rtol=5e-2, atol=5e-2,
                                   msg=k)
