"""Losses of Mutual-Taught: sequence log-probs, the E-step preference losses,
the M-step Bradley-Terry loss.

Every loss returns `(loss, metrics)` where `loss` is the per-pair vector (B,) and every metric a
detached per-pair vector (B,). Nothing is reduced here: the trainer sums over its micro-batches and
divides by the GLOBAL number of pairs (all micro-batches, all ranks), so gradient accumulation and
world size do not change the result (DESIGN.md Sec. 4). No host syncs here; `.item()` happens at
log time in the trainer.
"""
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


def preference_objective(loss: str) -> Objective:
    """E-step, Eq. 4 (and cDPO / IPO / hinge / SimPO): one forward over chosen + rejected rows."""
    spec = LOSSES[loss]

    def step(model, batch, cfg):
        logits = model(batch.ids, attention_mask=batch.attention_mask)  # (2b, T, V)
        logps = sequence_logps(logits, batch.ids, batch.loss_mask,
                               average=spec.average_logps)  # (2b,) fp32
        b = batch.ids.shape[0] // 2
        return spec.fn(logps[:b], logps[b:], batch.ref_chosen, batch.ref_rejected, cfg)
    # the loss itself is in cfg.loss
    return Objective("dpo", step, uses_reference=spec.uses_reference)


def _bradley_terry_step(model, batch, cfg):
    """Eq. 5: scores at each sequence's last real token (read by length, never by pad id)."""
    r = model.rewards(batch.ids, attention_mask=batch.attention_mask,
                      lengths=batch.lengths).float()  # (2b,)
    b = batch.ids.shape[0] // 2
    return bradley_terry_loss(r[:b], r[b:], cfg.margin)


def _sft_step(model, batch, cfg):
    """Next-token NLL summed over each row's response tokens;
    the loop divides by the global token count."""
    logits = model(batch.ids, attention_mask=batch.attention_mask)  # (b, T, V)
    return -sequence_logps(logits, batch.ids, batch.loss_mask), {}


BRADLEY_TERRY = Objective("rm", _bradley_terry_step)  # M-step, Eq. 5
SFT = Objective("sft", _sft_step, pairwise=False, per_token=True)  # builds the sandbox's π0
