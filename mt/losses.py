"""Losses of Mutual-Taught: the M-step Bradley-Terry loss, the E-step preference losses, and the
objectives the training loop takes.

Every loss returns `(loss, metrics)` where `loss` is the per-pair vector (B,) and every metric a
detached per-pair vector (B,). Nothing is reduced here: the trainer sums over its micro-batches and
divides by the GLOBAL number of pairs (all micro-batches, all ranks), so gradient accumulation and
world size do not change the result (DESIGN.md Sec. 4). The losses take sequence log-probs
(mt/logps.py); the objectives compute them with response_logps, whose one host sync per forward is
the only one here; `.item()` happens at log time in the trainer. An objective reads log-probs and
rewards through its batch (`batch.logps`, `batch.rewards`), so the padded layout (mt/train.py
Batch) and the packed one (mt/packing.py Packed) run the same step.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


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
        logps = batch.logps(model, spec.average_logps, full_logits)  # (2b,) fp32
        b = logps.shape[0] // 2
        return spec.fn(logps[:b], logps[b:], batch.ref_chosen, batch.ref_rejected, cfg)
    # the loss itself is in cfg.loss
    return Objective("dpo", step, uses_reference=spec.uses_reference)


def _bradley_terry_step(model, batch, cfg):
    """Eq. 5: scores at each sequence's last real token (read by length, never by pad id).

    No vocabulary projection here: the score head is (C, 1), its (2b, T) output is small, so the
    fused head of response_logps has nothing to save in the RM step."""
    r = batch.rewards(model)  # (2b,)
    r = r.to(torch.promote_types(r.dtype, torch.float32))  # fp32 (fp64 for fp64 weights)
    b = r.shape[0] // 2
    return bradley_terry_loss(r[:b], r[b:], cfg.margin)


def _sft_step(model, batch, cfg):
    """Next-token NLL summed over each row's response tokens;
    the loop divides by the global token count."""
    return -batch.logps(model), {}


BRADLEY_TERRY = Objective("rm", _bradley_terry_step)  # M-step, Eq. 5
SFT = Objective("sft", _sft_step, pairwise=False, per_token=True)  # builds the sandbox's π0
