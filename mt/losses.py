"""Losses of Mutual-Taught: sequence log-probs, the E-step preference losses,
the M-step Bradley-Terry loss.

Every loss returns `(loss, metrics)` where `loss` is the per-pair vector (B,) and every metric a
detached per-pair vector (B,). Nothing is reduced here: the trainer sums over its micro-batches and
divides by the GLOBAL number of pairs (all micro-batches, all ranks), so gradient accumulation and
world size do not change the result (DESIGN.md Sec. 4). No host syncs here but one per forward in
response_logps (the count of response positions, read before the forward); `.item()` happens at
log time in the trainer.
"""
import math
from dataclasses import dataclass
from typing import Callable

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
    log-softmax (_HeadTokenLogps). Equal to the full-logits path (tests/test_losses.py), which
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
    hidden = model(ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, C)
    h = hidden.reshape(B * T, -1).index_select(0, rows)  # (N, C)
    lp = _HeadTokenLogps.apply(h, _lm_head_weight(model), targets)  # (N,)
    logps = lp.new_zeros(B).index_add(0, rows // T, lp)  # (B,)
    return logps / mask.sum(-1).clamp(min=1) if average else logps


def _pair_metrics(loss, rewards_chosen, rewards_rejected, **extra):
    """The per-pair metrics every loss reports, detached. `correct`:
    chosen reward strictly above rejected."""
    m = dict(rewards_chosen=rewards_chosen, rewards_rejected=rewards_rejected,
             margin=rewards_chosen - rewards_rejected,
             correct=(rewards_chosen > rewards_rejected).to(rewards_chosen.dtype), **extra)
    return loss, {k: v.detach() for k, v in m.items()}


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=0.0):
    """Eq. 1 / Eq. 5 (M-step): -log sigma(r(y_w) - r(y_l) - margin), per pair (B,).

    `margin` (float or (B,)) is the Llama-2 style required gap;
    0 gives the paper's plain Bradley-Terry.
    """
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    return _pair_metrics(loss, chosen_rewards, rejected_rewards)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, label_smoothing=0.0, loss_type="sigmoid"):
    """Reference-based preference losses on summed sequence log-probs, per pair (B,).

    h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l); in the E-step pi_ref = pi_{t-1} (Eq. 4).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    rewards_chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # DPO's implicit reward
    rewards_rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # Eq. 2 / Eq. 4 (DPO, Rafailov et al. 2023): -log sigma(beta h). With label_smoothing eps >
        # 0 this is conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"):
        # each label is taken to be flipped with probability eps.
        loss = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, arXiv:2310.12036): regress h onto 1/(2 beta); sequence-level h as
        # in the paper (TRL averages per token instead; pass averaged log-probs to get that).
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        # Hinge (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425) on DPO's log-ratio h:
        # max(0, 1 - beta h).
        loss = F.relu(1 - beta * h)
    return _pair_metrics(loss, rewards_chosen, rewards_rejected,
                         logps_chosen=policy_chosen_logps, logps_rejected=policy_rejected_logps)


def simpo_loss(policy_chosen_logps_avg, policy_rejected_logps_avg, beta, gamma):
    """SimPO (Meng et al. 2024, arXiv:2405.14734):
    -log sigma(beta avg_logp_w - beta avg_logp_l - gamma).

    No reference model; takes length-averaged log-probs (`sequence_logps(..., average=True)`);
    `gamma` is the target reward margin itself (not gamma/beta).
    """
    rewards_chosen = beta * policy_chosen_logps_avg
    rewards_rejected = beta * policy_rejected_logps_avg
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected - gamma)
    return _pair_metrics(loss, rewards_chosen, rewards_rejected,
                         logps_chosen=policy_chosen_logps_avg,
                         logps_rejected=policy_rejected_logps_avg)


# ---- objectives: what the training loop optimises, as small values (the loop never tests a name)


@dataclass(frozen=True)
class PreferenceLoss:
    """One `--dpo.loss`: its loss on sequence log-probs, and what those log-probs must be."""
    fn: Callable  # (pi_chosen, pi_rejected, ref_chosen, ref_rejected, cfg) -> (loss (B,), metrics)
    uses_reference: bool  # reference log-probs are computed once before training (train_policy.py)
    average_logps: bool  # length-averaged log-probs (SimPO) instead of summed


def _dpo(c, r, rc, rr, cfg):
    return dpo_loss(c, r, rc, rr, cfg.beta, 0.0, "sigmoid")


def _cdpo(c, r, rc, rr, cfg):
    if not 0 < cfg.label_smoothing < 0.5:
        raise ValueError("--dpo.loss cdpo needs 0 < --dpo.label_smoothing < 0.5 (got "
                         f"{cfg.label_smoothing})")
    return dpo_loss(c, r, rc, rr, cfg.beta, cfg.label_smoothing, "sigmoid")


# A new preference loss for an ablation: a function above, one entry here
# (`--dpo.loss NAME` then works).
LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(_dpo, True, False),  # Eq. 2 / Eq. 4
    "cdpo": PreferenceLoss(_cdpo, True, False),
    "ipo": PreferenceLoss(
        lambda c, r, rc, rr, cfg: dpo_loss(c, r, rc, rr, cfg.beta, 0.0, "ipo"), True, False),
    "simpo": PreferenceLoss(
        lambda c, r, rc, rr, cfg: simpo_loss(c, r, cfg.beta, cfg.target_margin), False, True),
    "hinge": PreferenceLoss(
        lambda c, r, rc, rr, cfg: dpo_loss(c, r, rc, rr, cfg.beta, 0.0, "hinge"), True, False),
}
PREFERENCE_LOSSES = tuple(LOSSES)


@dataclass(frozen=True)
class Objective:
    """What differs between the trainings that share mt/train.py's loop.

    `step(model, batch, cfg)` returns the per-example loss (b,) and per-example metrics; `pairwise`
    batches carry chosen rows then rejected rows; a `per_token` loss is averaged over response
    tokens (SFT), a pairwise one over pairs.
    """
    name: str
    step: Callable
    pairwise: bool = True
    per_token: bool = False
    uses_reference: bool = False


def preference_objective(loss: str, full_logits: bool = False) -> Objective:
    """E-step, Eq. 4 (and cDPO / IPO / hinge / SimPO): one forward over chosen + rejected rows.

    The head runs fused with the log-softmax at response positions (response_logps);
    `full_logits=True` builds the (2b, T, V) logits instead (the reference path, for benchmarks).
    """
    spec = LOSSES[loss]

    def step(model, batch, cfg):
        logps = response_logps(model, batch.ids, batch.loss_mask, batch.attention_mask,
                               spec.average_logps, full_logits)  # (2b,) fp32
        b = batch.ids.shape[0] // 2
        return spec.fn(logps[:b], logps[b:], batch.ref_chosen, batch.ref_rejected, cfg)
    # the loss itself is in cfg.loss
    return Objective("dpo", step, uses_reference=spec.uses_reference)


def _bradley_terry_step(model, batch, cfg):
    """Eq. 5: scores at each sequence's last real token (read by length, never by pad id).

    No vocabulary projection here: the score head is (C, 1), its (2b, T) output is small, so the
    fused head of response_logps has nothing to save in the RM step."""
    r = model.rewards(batch.ids, attention_mask=batch.attention_mask,
                      lengths=batch.lengths)  # (2b,)
    r = r.to(torch.promote_types(r.dtype, torch.float32))  # fp32 (fp64 for fp64 weights)
    b = batch.ids.shape[0] // 2
    return bradley_terry_loss(r[:b], r[b:], cfg.margin)


def _sft_step(model, batch, cfg):
    """Next-token NLL summed over each row's response tokens;
    the loop divides by the global token count."""
    return -response_logps(model, batch.ids, batch.loss_mask, batch.attention_mask), {}


BRADLEY_TERRY = Objective("rm", _bradley_terry_step)  # M-step, Eq. 5
SFT = Objective("sft", _sft_step, pairwise=False, per_token=True)  # builds the sandbox's π0
