"""Tests for mt/token_rule.py against references: naive top-k / top-p distributions, the full-sort
token rule (the candidate shortcuts), and the Gumbel noise's distribution and keying."""

import pytest
import torch

from mt import token_rule
from mt.config import SamplingConfig
from mt.token_rule import gumbel, gumbel_at, next_token, stream_key


# ---- the token rule against naive distributions


def _keys(n: int, stream: str = "dist") -> torch.Tensor:
    ks = [stream_key(0, stream, "x", j) for j in range(n)]
    return torch.tensor([[k & 0xFFFFFFFF, k >> 32] for k in ks])  # (n, 2) uint32 halves


def _empirical(logits: torch.Tensor, cfg: SamplingConfig, n: int = 40000) -> torch.Tensor:
    """Token frequencies of n independent streams drawing from the same logits (1, V)."""
    tok = next_token(logits.expand(n, -1), _keys(n), torch.zeros(n, dtype=torch.long), cfg)
    return torch.bincount(tok, minlength=logits.size(-1)).double() / n


@pytest.mark.parametrize("candidates", [(64, 1024), (2, 4)])  # (2, 4): candidate tiers at V = 12
def test_top_p_top_k_and_temperature_sample_the_defined_distribution(monkeypatch, candidates):
    monkeypatch.setattr(token_rule, "CANDIDATES", candidates)
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    T = 0.7
    p = torch.softmax(logits[0].double() / T, -1)

    def nucleus(q, top_p):  # naive loop: add tokens by probability until the mass reaches top_p
        q = q / q.sum()
        keep, mass = [], 0.0
        for t in q.argsort(descending=True).tolist():
            keep.append(t)
            mass += q[t].item()
            if mass >= top_p:
                break
        out = torch.zeros_like(q)
        out[keep] = q[keep]
        return out / out.sum()

    def top_k(q, k):
        out = torch.zeros_like(q)
        idx = q.argsort(descending=True)[:k]
        out[idx] = q[idx]
        return out / out.sum()

    cases = [(SamplingConfig(temperature=T, top_p=1.0), p),
             (SamplingConfig(temperature=T, top_p=0.6), nucleus(p, 0.6)),
             (SamplingConfig(temperature=T, top_p=1.0, top_k=3), top_k(p, 3)),
             (SamplingConfig(temperature=T, top_p=0.7, top_k=5), nucleus(top_k(p, 5), 0.7))]  # top-k, then top-p
    for cfg, want in cases:
        got = _empirical(logits, cfg)
        assert (got - want).abs().max() < 0.012, (cfg, got, want)  # 40k draws: 3 sigma of the largest bin ~0.007
        assert got[want == 0].sum() == 0, "filtered tokens are never drawn"
    greedy = torch.zeros_like(p)
    greedy[logits.argmax()] = 1
    assert torch.equal(_empirical(logits, SamplingConfig(temperature=T, top_p=1e-6)), greedy)
    assert torch.equal(_empirical(logits, SamplingConfig(greedy=True)), greedy)


def _rule_by_sort(logits: torch.Tensor, keys, step, cfg: SamplingConfig) -> torch.Tensor:
    """The token rule as defined: a full sort for the kept set, noise for the whole vocabulary."""
    scores = logits / cfg.temperature
    if 0 < cfg.top_k < scores.size(-1):
        kth = scores.topk(cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))  # ties with the k-th stay
    if cfg.top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        sorted_p = probs.sort(dim=-1, descending=True).values
        n_keep = ((sorted_p.cumsum(-1) - sorted_p) < cfg.top_p).sum(-1, keepdim=True)
        scores = scores.masked_fill(probs < sorted_p.gather(1, n_keep - 1), float("-inf"))
    return (scores + gumbel(keys, step, logits.size(-1))).argmax(-1)


def test_candidate_shortcuts_draw_what_the_full_sort_draws(monkeypatch):
    """Top-k / top-p over candidates, the tier skip bound and the radix select give the token the
    full sort over the vocabulary gives, row for row: peaked and flat rows, ties at the k-th and at
    the top-p boundary, -0.0, tiny and large p."""
    monkeypatch.setattr(token_rule, "CANDIDATES", (8, 64))  # small tiers, so rows take every way
    taken = {8: 0, 64: 0, "radix": 0}  # rows that looked at 8 and at 64 candidates, radix rows
    at, radix = token_rule.gumbel_at, token_rule._radix_threshold

    def at_(keys, step, ids):
        taken[ids.size(1)] = taken.get(ids.size(1), 0) + ids.size(0)
        return at(keys, step, ids)

    def radix_(s, lse, p):
        taken["radix"] += s.size(0)
        return radix(s, lse, p)
    monkeypatch.setattr(token_rule, "gumbel_at", at_)
    monkeypatch.setattr(token_rule, "_radix_threshold", radix_)
    g = torch.Generator().manual_seed(0)
    S, V = 192, 3000
    for scale in (0.05, 0.5, 2.0, 6.0):  # from flat (radix) to peaked (the first tier)
        logits = torch.randn(S, V, generator=g) * scale * torch.rand(S, 1, generator=g) * 2
        logits[:8, :30] = logits[:8, :1]  # ties, at the k-th and in the top-p set
        logits[8:16] = logits[8:16].round()  # many ties
        logits[16, :5] = -0.0
        logits[16, 5:10] = 0.0
        keys = torch.randint(0, 2 ** 32, (S, 2), generator=g)
        step = torch.randint(0, 1000, (S,), generator=g)
        for T, p, k in [(0.7, 0.9, 0), (1.0, 0.5, 0), (1.0, 0.95, 0), (1.0, 1e-6, 0),
                        (0.7, 1.0, 5), (1.0, 0.9, 20), (1.0, 0.5, 3), (1.0, 1.0, 0)]:
            cfg = SamplingConfig(temperature=T, top_p=p, top_k=k)
            want = _rule_by_sort(logits, keys, step, cfg)
            assert torch.equal(next_token(logits, keys, step, cfg), want), (scale, T, p, k)
    assert taken[64] > 200 and 1000 < taken["radix"] < taken[8] - 1000, "every way is taken"


def test_gumbel_noise_is_gumbel_and_keyed():
    n, V = 2000, 64
    g = gumbel(_keys(n, "g"), torch.arange(n), V)  # (n, V): n streams at n different steps
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - torch.pi ** 2 / 6) < 0.03
    # the Gumbel CDF exp(-exp(-x)) maps the noise to U(0, 1): check deciles
    u = torch.exp(-torch.exp(-g.flatten().double()))
    assert (torch.histc(u.float(), bins=10, min=0, max=1) / u.numel() - 0.1).abs().max() < 0.005
    c = torch.corrcoef(torch.cat([g[:-1, :8], g[1:, :1]], 1).T)  # 8 tokens of a row, and the next row
    assert (c - torch.eye(9)).abs().max() < 0.1, "tokens and rows are uncorrelated"
    again = gumbel(_keys(n, "g"), torch.arange(n), V)
    assert torch.equal(g, again), "a pure function of (key, step, token)"
    assert not torch.equal(g, gumbel(_keys(n, "g"), torch.arange(n) + 1, V)), "another step, other noise"
    ids = torch.randint(0, V, (n, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(gumbel_at(_keys(n, "g"), torch.arange(n), ids), g.gather(1, ids)), \
        "a token's noise is the same whichever tokens are drawn with it"
