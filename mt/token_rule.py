"""The token rule: one token per row from the logits, reproducible by construction.

Temperature, top-k and top-p as the paper's sampler defines them (appendix B, following SimPO: T=0.8,
top-p 0.95), drawn by the Gumbel-max trick with counter-based noise: token t of job (seed, stream,
prompt id, j) takes its noise from a hash of that tuple, t and the token id, so no generator state is
shared between rows and a response does not depend on slot count, batch, world size or order. The
kept set is found without sorting the vocabulary (candidate tiers, then a radix select) and the
noise is computed for its candidates only; a token's noise is the same either way.

`next_token` is the rule; `draft_token` is its first tier alone, without a host sync, for the decode
loop of mt/sampler.py (the engine), which redraws at its harvest the rows the draft could not settle.
"""
from __future__ import annotations

import hashlib

import torch

from mt.config import SamplingConfig


# ---- counter-based randomness

M32 = 0xFFFFFFFF


def stream_key(seed: int, stream: str, prompt_id: str, sample_index: int) -> int:
    """The 64-bit key of one response's random stream; `stream` names the use, e.g. "iter1/policy"."""
    h = hashlib.sha256(f"{seed}\x1f{stream}\x1f{prompt_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # lowbias32 (C. Wellons' hash-prospector) on uint32 values held in int64; both multipliers are
    # below 2^31, so no product overflows int64 and the result is the same on every backend
    x = x ^ (x >> 16)  # a new tensor: the rest works in place
    x.mul_(0x21F0AAAD).bitwise_and_(M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(M32)
    return x.bitwise_xor_(x >> 15)


def _token_hash(vocab: int, device) -> torch.Tensor:
    """_mix32 of every token id (V,): the same for every row and step, so kept once per vocab."""
    key = (vocab, str(device))
    if key not in _TOKEN_HASH:
        _TOKEN_HASH[key] = _mix32(torch.arange(vocab, device=device))
    return _TOKEN_HASH[key]


_TOKEN_HASH: dict = {}


def _row_seed(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return _mix32(keys[:, 0] ^ _mix32(keys[:, 1] ^ _mix32(step)))  # (S,) this step's seed


def _to_gumbel(h: torch.Tensor) -> torch.Tensor:
    # 1 - U with 32-bit resolution near 0, where the largest noise values (the ones that win) come from
    v = h.float().add_(0.5).mul_(2.0 ** -32).clamp_(max=1.0 - 2.0 ** -24)
    return v.neg_().log1p_().neg_().log_().neg_()  # -log(E), E = -log(1 - v) ~ Exp(1)


def gumbel_at(keys: torch.Tensor, step: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise (S, C) of tokens `ids` (S, C) at token `step` (S,) of each row's stream, keys
    (S, 2) = its uint32 halves. A value depends only on (key, step, token id): the same whichever
    tokens are asked for alongside it, so drawing over candidates draws what the whole vocabulary
    would."""
    return _to_gumbel(_mix32(_row_seed(keys, step)[:, None] ^ _mix32(ids)))


def gumbel(keys: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """gumbel_at over the whole vocabulary: (S, V)."""
    return _to_gumbel(_mix32(_row_seed(keys, step)[:, None] ^ _token_hash(vocab, keys.device)))


# ---- one token from the logits

CANDIDATES = (64, 1024)  # top-p looks for its set among a row's 64, then 1,024 most likely tokens


def next_token(logits: torch.Tensor, keys: torch.Tensor, step: torch.Tensor,
               cfg: SamplingConfig) -> torch.Tensor:
    """Tokens (S,) from fp32 logits (S, V): greedy, or Gumbel-max over the tempered, filtered logits.

    top-k keeps the k most likely tokens (and ties with the k-th); top-p then keeps, of what is
    left (renormalised), the smallest most-likely set whose mass reaches p (and ties with its least
    likely token). argmax(logits / T + Gumbel noise) over the kept set draws from
    softmax(logits / T) renormalised on it (the Gumbel-max trick); as the noise is keyed by (row
    key, step, token id), a tiny change in one logit can flip the draw only when two noisy scores
    nearly tie, so fp rounding that differs with the batch shape almost never matters.

    The kept set is found without sorting the vocabulary, and the noise is drawn for it only.
    top-k is one `topk`; top-p alone looks among each row's CANDIDATES most likely tokens (once
    their mass reaches p, the set is among them; a bound on the mass a larger tier could reach
    skips it). A row whose set is not there (a flat distribution) gets its threshold score from a
    radix select over the whole vocabulary, and noise for every token. Every way finds the
    threshold a full sort finds, and a token's noise does not depend on which tokens are looked
    at, so the token drawn is the same whichever way a row goes (tests/test_token_rule.py checks each
    way against the sort).
    """
    if cfg.greedy or cfg.temperature <= 0:
        return logits.argmax(-1)
    s = logits / cfg.temperature  # (S, V)
    S, V = s.shape
    k = cfg.top_k if 0 < cfg.top_k < V else 0
    p = cfg.top_p if cfg.top_p < 1.0 else None
    if not k and p is None:  # nothing filtered: every token is a candidate
        return (s + gumbel(keys, step, V)).argmax(-1)
    tok = torch.empty(S, dtype=torch.long, device=s.device)
    todo = torch.arange(S, device=s.device)
    later = []  # rows for the radix select: no tier can hold their set
    lse = None if k else torch.logsumexp(s, -1)  # top-p alone: masses in the full softmax
    tiers = [k] if k else [c for c in CANDIDATES if c < V]
    for j, c in enumerate(tiers):
        if not todo.numel():
            break
        if j == 0:  # the first tier looks at every row, in order
            tok, found, before, probs = _tier(s, lse, keys, step, c, k, p)
        else:
            tok[todo], found, before, probs = _tier(s[todo], None if k else lse[todo], keys[todo],
                                                    step[todo], c, k, p)
        if found.all():  # a host sync: next_token runs at the harvest (draft_token in the loop)
            return tok
        todo = todo[~found]
        if not k and j + 1 < len(tiers):  # the next tier's mass is at most these c + 1, and
            # each of its others weighs at most the one left out here
            mass, last = (before[:, c] + probs[:, c])[~found], probs[~found, c]
            go = mass + (tiers[j + 1] - c - 1) * last >= p
            later.append(todo[~go])
            todo = todo[go]
    todo = torch.cat([todo, *later])
    if not todo.numel():
        return tok
    every = todo.numel() == S  # then as they are: no copies
    sr, kr, st = (s, keys, step) if every else (s[todo], keys[todo], step[todo])
    if k:  # the top-k set with its ties, renormalised
        kth = sr.topk(k).values[:, -1:]
        masked = sr.masked_fill(sr < kth, float("-inf"))
        tau = kth if p is None else _radix_threshold(masked, masked.logsumexp(-1), p)
    else:
        tau = _radix_threshold(sr, lse if every else lse[todo], p)
    z = gumbel(kr, st, V).add_(sr).masked_fill_(sr < tau, float("-inf")).argmax(-1)
    if every:
        return z
    tok[todo] = z
    return tok


def _tier(s, lse, keys, step, c: int, k: int, p: float | None):
    """One candidate tier of next_token for rows s (r, V): the Gumbel-max draw among each row's c
    most likely tokens, tok (r,), and found (r,), True where the kept set lies among them (then the
    draw is the rule's); `before` and `probs` feed next_token's bound on the next tier. No host sync."""
    vals, idx = s.topk(c + 1)  # c candidates and the best token left out
    probs = torch.softmax(vals[:, :c], -1) if k else (vals - lse[:, None]).exp()
    before = None
    if p is None:
        n = torch.full((s.shape[0],), c, dtype=torch.long, device=s.device)
    else:
        before = probs.cumsum(-1) - probs  # the mass more likely than each candidate
        n = (before[:, :c] < p).sum(-1)
    tau = vals.gather(1, n[:, None] - 1)  # the least likely kept score
    # the set is among the candidates if the one left out is neither kept nor tied with the
    # least likely kept one (top-k: with the k-th)
    found = vals[:, c] < (vals[:, c - 1: c] if k else tau)[:, 0]
    if not k:
        found &= before[:, c] >= p
    v, i = vals[:, :c], idx[:, :c]  # a draw for every row here; the rows not found redraw
    z = torch.where(v >= tau, v + gumbel_at(keys, step, i), float("-inf"))
    return i.gather(1, z.argmax(-1, keepdim=True))[:, 0], found, before, probs


def draft_token(logits: torch.Tensor, keys: torch.Tensor, step: torch.Tensor,
                cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """next_token's first candidate tier alone, with no host sync: tokens (S,) and exact (S,), True
    where the row's kept set lay among its candidates, so its token is next_token's; exact is None
    when every token is (greedy, or nothing filtered). The decode loop draws with this and redraws the
    other rows with next_token at the harvest (_Engine.redraw), from the logits it kept."""
    if cfg.greedy or cfg.temperature <= 0:
        return logits.argmax(-1), None
    s = logits / cfg.temperature  # (S, V)
    V = s.shape[1]
    k = cfg.top_k if 0 < cfg.top_k < V else 0
    p = cfg.top_p if cfg.top_p < 1.0 else None
    if not k and p is None:
        return (s + gumbel(keys, step, V)).argmax(-1), None
    c = k or next((c for c in CANDIDATES if c < V), 0)
    if not c:  # a vocabulary no tier fits: every row is the radix select's (next_token; syncs)
        return next_token(logits, keys, step, cfg), None
    tok, found, _, _ = _tier(s, None if k else torch.logsumexp(s, -1), keys, step, c, k, p)
    return tok, found


def _radix_threshold(s: torch.Tensor, lse: torch.Tensor, p: float) -> torch.Tensor:
    """The top-p threshold of each row of scores s (r, V): the largest score t with
    mass(s >= t) >= p (r, 1), by a radix select on the float bits, 11 + 11 + 10 of them, the masses
    summed in fp64."""
    r, V = s.shape
    dev = s.device
    b = (s + 0.0).view(torch.int32)  # + 0.0: no -0.0
    key = b.bitwise_xor_((b >> 31).bitwise_and_(0x7FFFFFFF))  # signed int32, in the scores' order
    mass = (s - lse[:, None]).exp_()
    rows = None  # level 1 works on (r, V) as it is; later levels on the elements left, flat
    prefix = torch.zeros(r, dtype=torch.long, device=dev)
    above = torch.zeros(r, 1, dtype=torch.float64, device=dev)  # the mass above the prefix
    for shift, bits in ((21, 11), (10, 11), (0, 10)):
        B = 1 << bits
        if rows is None:  # the top 11 bits (sign, exponent, 2 of the mantissa) as 0 .. 2047
            digit = (key >> shift).add_(1024)
            bins = (digit + torch.arange(0, r * B, B, device=dev)[:, None]).flatten()
        else:
            digit = (key >> shift).bitwise_and_(B - 1)
            bins = rows * B + digit
        m = torch.bincount(bins, weights=mass.flatten(), minlength=r * B).view(r, B)
        up = above + m.flip(-1).cumsum(-1).flip(-1)  # the mass at or above each digit
        d = ((up >= p).sum(-1, keepdim=True) - 1).clamp_(min=0)  # the highest digit reaching p
        above = up.gather(1, d) - m.gather(1, d)
        prefix = (prefix << bits) | (d[:, 0] - (1024 if rows is None else 0))
        if rows is None:
            rows, cols = (digit == d).nonzero(as_tuple=True)
            key, mass = key[rows, cols], mass[rows, cols]
        else:
            keep = digit == d[rows, 0]
            key, mass, rows = key[keep], mass[keep], rows[keep]
    b = prefix.to(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32)[:, None]
