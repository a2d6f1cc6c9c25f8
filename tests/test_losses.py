"""mt/losses.py against closed-form values and autograd's numerical gradients."""
import math

import pytest
import torch

from mt import losses
from mt.config import Config, DPOConfig, parse
from mt.flags import ConfigError
from mt.losses import bradley_terry_loss, dpo_loss, simpo_loss

f64 = dict(dtype=torch.float64)


def softplus(x):  # -log sigma(x) = log(1 + e^-x), written out independently of torch
    return math.log1p(math.exp(-x))


# ---- closed-form values (float64)

def dpo_inputs():
    # policy/ref log-ratios: chosen +12, rejected -8 -> h = 20; second pair h = -3
    pc, pr = torch.tensor([-10.0, -5.0], **f64), torch.tensor([-30.0, -6.0], **f64)
    rc, rr = torch.tensor([-22.0, -4.0], **f64), torch.tensor([-22.0, -8.0], **f64)
    return pc, pr, rc, rr


def test_dpo_sigmoid_closed_form():
    loss, m = dpo_loss(*dpo_inputs(), beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([softplus(2.0), softplus(-0.3)], **f64))
    torch.testing.assert_close(m["rewards_chosen"], torch.tensor([1.2, -0.1], **f64))
    torch.testing.assert_close(m["rewards_rejected"], torch.tensor([-0.8, 0.2], **f64))
    torch.testing.assert_close(m["margin"], torch.tensor([2.0, -0.3], **f64))
    assert m["correct"].tolist() == [1.0, 0.0]
    assert all(not v.requires_grad for v in m.values())


def test_cdpo_label_smoothing_closed_form():
    eps = 0.1
    loss, _ = dpo_loss(*dpo_inputs(), beta=0.1, label_smoothing=eps)
    want = [(1 - eps) * softplus(b) + eps * softplus(-b) for b in (2.0, -0.3)]
    torch.testing.assert_close(loss, torch.tensor(want, **f64))
    ref, _ = losses.LOSSES["cdpo"].fn(*dpo_inputs(), DPOConfig(loss="cdpo", beta=0.1, label_smoothing=eps))
    torch.testing.assert_close(ref, loss)


def test_ipo_closed_form():
    loss, _ = dpo_loss(*dpo_inputs(), beta=0.1, loss_type="ipo")  # (h - 1/(2 beta))^2, 1/(2 beta) = 5
    torch.testing.assert_close(loss, torch.tensor([15.0**2, 8.0**2], **f64))


def test_hinge_closed_form():
    loss, _ = dpo_loss(*dpo_inputs(), beta=0.1, loss_type="hinge")  # max(0, 1 - beta h)
    torch.testing.assert_close(loss, torch.tensor([0.0, 1.3], **f64))


def test_simpo_closed_form():
    avg_c, avg_r = torch.tensor([-1.0, -0.5], **f64), torch.tensor([-1.5, -2.0], **f64)
    loss, m = simpo_loss(avg_c, avg_r, beta=2.0, gamma=1.0)  # 2*(-1+1.5)-1 = 0 ; 2*(-0.5+2)-1 = 2
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), softplus(2.0)], **f64))
    torch.testing.assert_close(m["margin"], torch.tensor([1.0, 3.0], **f64))
    same, _ = losses.LOSSES["simpo"].fn(avg_c, avg_r, None, None, DPOConfig(beta=2.0, target_margin=1.0))
    torch.testing.assert_close(same, loss)


def test_bradley_terry_closed_form():
    rc, rr = torch.tensor([1.5, 0.0, -2.0], **f64), torch.tensor([0.5, 0.0, 1.0], **f64)
    loss, m = bradley_terry_loss(rc, rr)
    torch.testing.assert_close(loss, torch.tensor([softplus(1.0), math.log(2.0), softplus(-3.0)], **f64))
    assert m["correct"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a correct ranking
    torch.testing.assert_close(m["margin"], torch.tensor([1.0, 0.0, -3.0], **f64))
    loss, _ = bradley_terry_loss(rc, rr, margin=1.0)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0), softplus(-1.0), softplus(-4.0)], **f64))
    loss, _ = bradley_terry_loss(rc, rr, margin=torch.tensor([0.0, -2.0, 1.0], **f64))
    torch.testing.assert_close(loss, torch.tensor([softplus(1.0), softplus(2.0), softplus(-4.0)], **f64))


def test_registry_errors_name_what_to_change():
    args = dpo_inputs()
    with pytest.raises(ConfigError, match="--dpo.loss='kto': must be one of"):
        parse(["--dpo.loss", "kto"], Config())
    with pytest.raises(ConfigError, match="applies only to --dpo.loss cdpo"):
        parse(["--dpo.loss", "dpo", "--dpo.label_smoothing", "0.1"], Config())
    with pytest.raises(ValueError, match="0 < --dpo.label_smoothing < 0.5"):
        losses.LOSSES["cdpo"].fn(*args, DPOConfig(loss="cdpo", label_smoothing=0.0))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, beta=0.1, loss_type="cdpo")
    # one registry entry per loss; the config's allowed values are its names
    assert losses.PREFERENCE_LOSSES == tuple(losses.LOSSES) == ("dpo", "cdpo", "ipo", "simpo", "hinge")
    assert [n for n, s in losses.LOSSES.items() if not s.uses_reference] == ["simpo"]
    assert [n for n, s in losses.LOSSES.items() if s.average_logps] == ["simpo"]


# ---- gradients: autograd vs finite differences, and stability at extreme margins

LOSSES = {
    "dpo": lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1)[0],
    "cdpo": lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1, label_smoothing=0.2)[0],
    "ipo": lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1, loss_type="ipo")[0],
    "hinge": lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1, loss_type="hinge")[0],
    "simpo": lambda a, b, c, d: simpo_loss(a, b, beta=2.0, gamma=0.5)[0],
    "bt": lambda a, b, c, d: bradley_terry_loss(a, b, margin=c)[0],
}


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(name):
    torch.manual_seed(0)
    x = [torch.randn(4, **f64, requires_grad=True) for _ in range(4)]  # hinge kink at h=10: not hit
    assert torch.autograd.gradcheck(lambda *a: LOSSES[name](*a), x)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_extreme_margins(name, dtype):
    pc = torch.tensor([1e4, -1e4, 0.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e4, 1e4, 0.0], dtype=dtype, requires_grad=True)
    zero = torch.zeros(3, dtype=dtype)
    loss = LOSSES[name](pc, pr, zero, zero)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if name in ("dpo", "simpo", "bt"):  # -log sigma(+big) -> 0, -log sigma(-big) ~ big: no overflow to inf
        assert loss[0] < 1e-6 and loss[1] > 100
