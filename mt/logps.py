"""Sequence log-probs log pi(y | x) of responses: the sum over their tokens from the logits
(sequence_logps), and the same numbers computed from the final hidden states without the (B, T, V)
logits (response_logps: the LM head fused with the log-softmax at response positions only).

Log-probs come back per sequence (B,), in fp32 (or fp64), for the losses of mt/losses.py. No host
syncs here but one per forward in response_logps (the count of response positions, read before
the forward).
"""
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_CHUNK_ELEMS = 2**25  # fp32 temporaries stay <= 128 MiB whatever the vocabulary size


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] per row, in fp32 (or fp64),
    without saving an upcast (N, V) copy.

    Autograd through `logits.float().logsumexp(-1)` would keep a full fp32 copy of the logits alive
    until backward (2 GiB for 2x2048 tokens of a 128k vocabulary); here only the bf16 logits and
    lse (N,) are kept.
    """

    @staticmethod
    def forward(ctx, logits, targets):  # (N, V), (N,) -> (N,)
        acc = torch.promote_types(logits.dtype, torch.float32)
        out = logits.new_empty(logits.shape[0], dtype=acc)
        lse = torch.empty_like(out)
        rows = max(1, _CHUNK_ELEMS // logits.shape[1])
        for i in range(0, logits.shape[0], rows):
            x = logits[i:i + rows].to(acc)
            lse[i:i + rows] = torch.logsumexp(x, -1)
            out[i:i + rows] = x.gather(-1, targets[i:i + rows, None]).squeeze(-1) - lse[i:i + rows]
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # d/dx_v (x_y - lse(x)) = 1[v = y] - softmax(x)_v
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        rows = max(1, _CHUNK_ELEMS // logits.shape[1])
        for i in range(0, logits.shape[0], rows):
            g = grad_out[i:i + rows, None]
            d = -g * torch.exp(logits[i:i + rows].to(lse.dtype) - lse[i:i + rows, None])
            grad[i:i + rows] = d.scatter_add_(-1, targets[i:i + rows, None], g)
        return grad, None


def sequence_logps(logits, labels, loss_mask, average=False):
    """Sum (or mean, if `average`) of log p(label_t | label_<t) over the response tokens,
    in fp32: (B,).

    Pass `labels` = input_ids (B, T) and `loss_mask` (B, T) true at the positions of response
    tokens in input_ids; the shift is done here (logits[:, t] predicts labels[:, t+1]), so
    loss_mask[:, 0] is ignored. Labels outside the mask may be anything (pad, -100). A row with no
    response token gives 0.
    """
    B, T, V = logits.shape
    # Target of position t is token t+1; the last position predicts nothing. Padding the targets
    # instead of slicing logits[:, :-1] avoids copying the (non-contiguous) logits.
    mask = torch.cat([loss_mask[:, 1:].bool(),
                      loss_mask.new_zeros(B, 1, dtype=torch.bool)], 1)  # (B, T)
    targets = torch.cat([labels[:, 1:], labels.new_zeros(B, 1)], 1)
    targets = torch.where(mask, targets, 0).long()
    logps = _TokenLogps.apply(logits.reshape(B * T, V), targets.reshape(B * T)).view(B, T)
    logps = torch.where(mask, logps, 0.0).sum(-1)  # (B,)
    return logps / mask.sum(-1).clamp(min=1) if average else logps


# ---- memory: the LM head fused with the log-softmax, at response positions only
#
# sequence_logps above is the equation; fed full logits it needs the (2b, T, V) tensor and a
# gradient of the same size for every position, prompt and padding included: at a 128k vocabulary,
# T = 2,048 and 2 pairs per micro-batch, 2 x 2.1 GB (bf16) per micro-batch, and LM-head FLOPs for
# positions whose log-prob is never used. response_logps computes the same numbers from the final
# hidden states: rows at response positions only, the head's matmul and the log-softmax fused over
# vocabulary blocks, the logits recomputed block by block in the backward (as Cut Cross-Entropy,
# Wijmans et al. 2024, arXiv:2411.09009, does in a kernel; Liger's fused linear cross-entropy,
# Hsu et al. 2024, arXiv:2410.10989, chunks rows instead). Blocks of the vocabulary, not of rows,
# so each block of the head's weight gradient is one matmul over all rows, rounded once, as the
# full-logits backward rounds it (no (V, C) fp32 accumulator).


def _block_cols(rows: int) -> int:
    """Vocabulary columns per block: (rows, cols) fp32 stays <= _CHUNK_ELEMS; a multiple of 128
    when that large (aligned rows for the GPU's matmuls)."""
    c = _CHUNK_ELEMS // max(rows, 1)
    return c - c % 128 if c >= 128 else max(1, c)


class _HeadTokenLogps(torch.autograd.Function):
    """log softmax(h W^T)[target] per row (N,), in fp32 (or fp64), never holding more than an
    (N, cols) block of logits: the log-sum-exp is accumulated over vocabulary blocks in the
    forward; the backward recomputes each block's logits (one more head matmul: 4 instead of 3,
    on the response rows only) and writes that block's rows of dW.

    Only h (N, C), W and lse (N,) are saved. Logits are computed in W's dtype and upcast, as
    `sequence_logps(lm_head(h))` computes them, so bf16 results match that path's rounding.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):  # (N, C), (V, C), (N,) -> (N,)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        N, V = hidden.shape[0], weight.shape[0]
        lse = hidden.new_full((N,), -math.inf, dtype=acc)
        picked = hidden.new_zeros(N, dtype=acc)
        cols = _block_cols(N)
        for v0 in range(0, V, cols):
            z = F.linear(hidden, weight[v0:v0 + cols]).to(acc)  # (N, cols)
            lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
            t = targets - v0
            inside = (t >= 0) & (t < z.shape[1])
            hit = z.gather(1, t.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
            picked = torch.where(inside, hit, picked)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return picked - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # d/dz_v (z_y - lse(z)) = 1[v = y] - softmax(z)_v, z = h W^T
        hidden, weight, targets, lse = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        g = grad_out.to(lse.dtype)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden, dtype=lse.dtype) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        cols = _block_cols(N)
        for v0 in range(0, V, cols):
            w = weight[v0:v0 + cols]
            z = F.linear(hidden, w).to(lse.dtype)  # (N, cols), recomputed
            d = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
            t = targets - v0
            inside = (t >= 0) & (t < d.shape[1])
            d.scatter_add_(1, t.clamp(0, d.shape[1] - 1)[:, None],
                           torch.where(inside, g, 0.0)[:, None])
            d = d.to(hidden.dtype)  # dL/dlogits in the logits' dtype, as autograd would have it
            if need_w:
                torch.mm(d.t(), hidden, out=grad_w[v0:v0 + cols])
            if need_h:
                grad_h += (d @ w).to(grad_h.dtype)
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, None


def _lm_head_weight(model):
    """The LM head's weight as the forward just used it (tied or not: one Parameter).

    Under FSDP2 the root module's parameters (embeddings, final norm, head) are gathered by the
    root's forward and stay gathered until its backward has run (the root does not reshard after
    forward), so read right after `model(...)` this is the full, unsharded weight in the compute
    dtype, and its gradient is reduce-scattered by the root's post-backward like any other. A
    sharded DTensor here means it was read outside that window: refuse rather than compute a
    wrong head.
    """
    w = model.lm_head.weight
    if type(w).__name__ == "DTensor":
        raise RuntimeError("lm_head.weight is still sharded (a DTensor): read it after the "
                           "model's forward, which gathers the root's parameters")
    return w


def response_logps(model, ids, loss_mask, attention_mask=None, average=False,
                   full_logits=False):
    """`sequence_logps(model(ids), ids, loss_mask, average)` (B,) fp32, without the (B, T, V)
    logits: the head is applied to the hidden states of response positions only, fused with the
    log-softmax (_HeadTokenLogps). Equal to the full-logits path (tests/test_logps.py), which
    `full_logits=True` runs instead (the reference; eval/bench_train.py --head full).

    One host sync, before the forward: the number of response positions sizes the head's work.
    """
    if full_logits:
        logits = model(ids, attention_mask=attention_mask)  # (B, T, V)
        return sequence_logps(logits, ids, loss_mask, average)
    B, T = ids.shape
    mask = torch.cat([loss_mask[:, 1:].bool(),
                      loss_mask.new_zeros(B, 1, dtype=torch.bool)], 1)  # position t predicts t+1
    rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions whose target is a response
    targets = torch.cat([ids[:, 1:], ids.new_zeros(B, 1)], 1).reshape(-1)[rows].long()
    return packed_logps(model, ids, rows, targets, rows // T, B, average,
                        attention_mask=attention_mask)


def packed_logps(model, ids, pred, targets, owner, n, average=False, full_logits=False,
                 **forward):
    """Per sequence s (n,): the sum (or mean) over i with owner[i] = s of log p(targets[i]), read
    from the model's output at flat position pred[i] of `model(ids, **forward)`. The layout-free
    core of response_logps, and what a packed batch (mt/packing.py) reads: there a token's
    predictor is not always the position before it (a rejected branch's first token is predicted
    by the shared prompt's last one)."""
    if full_logits:  # the reference: (R, W, V) logits, gathered
        logits = model(ids, **forward)
        lp = _TokenLogps.apply(logits.reshape(-1, logits.shape[-1]).index_select(0, pred), targets)
    else:
        hidden = model(ids, return_hidden=True, **forward)  # (B, T, C)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred)  # (N, C)
        lp = _HeadTokenLogps.apply(h, _lm_head_weight(model), targets)  # (N,)
    logps = lp.new_zeros(n).index_add(0, owner, lp)  # (n,)
    if average:
        return logps / torch.bincount(owner, minlength=n).clamp(min=1).to(logps.dtype)
    return logps
