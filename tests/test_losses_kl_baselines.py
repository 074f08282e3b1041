"""The paper's KD baseline (losses/distill_kl.py) and KL on the teacher's binary codes (kl_bits.py's kl_codes)."""

import math

import pytest
import torch

from brcd_dist.config import BRCDConfig
from brcd_dist.losses import (
    KDInputs,
    distill_kl_loss,
    kd_loss,
    kl_bits_loss,
    kl_codes_loss,
)
from brcd_dist.losses.kl_bits import smoothed_code_targets


def test_distill_kl_hand_value():
    """L = 2, T = 4: teacher (1, 1) -> softmax (½, ½); student (1, −1) -> softmax ∝ (e^{1/4}, e^{−1/4}).
    T²·KL(teacher ‖ student) = 16·Σ ½·log(½ / p_s)."""
    s = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    z = math.exp(0.25) + math.exp(-0.25)
    ps = [math.exp(0.25) / z, math.exp(-0.25) / z]
    expected = 16 * sum(0.5 * math.log(0.5 / p) for p in ps)
    assert math.isclose(distill_kl_loss(s, t).item(), expected, rel_tol=1e-12)


def test_distill_kl_averages_over_rows_not_entries():
    s = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert math.isclose(distill_kl_loss(s, t).item(), distill_kl_loss(s[:1], t[:1]).item() / 2, rel_tol=1e-12)


def test_distill_kl_is_zero_when_codes_match_and_the_teacher_gets_no_gradient():
    t = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    s = t.detach().clone().requires_grad_(True)
    loss = distill_kl_loss(s, t)
    loss.backward()
    assert abs(loss.item()) < 1e-12 and t.grad is None


def test_kl_codes_hand_values_for_both_signs():
    """ε = 0.1: t = +1 -> q = 0.95, t = −1 -> q = 0.05; against p = ½ each bit gives KL(q ‖ ½), summed over bits."""
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    t = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    per_bit = 0.95 * math.log(0.95 / 0.5) + 0.05 * math.log(0.05 / 0.5)
    assert math.isclose(kl_codes_loss(p, t).item(), 2 * per_bit, rel_tol=1e-6)


def test_kl_codes_is_kl_bits_on_smoothed_targets():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 2, (4, 8), generator=g).double() * 2 - 1
    assert torch.equal(kl_codes_loss(p, t, eps=0.2), kl_bits_loss(p, smoothed_code_targets(t, eps=0.2)))
    assert torch.allclose(smoothed_code_targets(torch.tensor([1.0, -1.0]), eps=0.2), torch.tensor([0.9, 0.1]))


def test_kl_codes_rejects_eps_outside_the_open_unit_interval():
    with pytest.raises(ValueError, match="eps=0.0"):
        smoothed_code_targets(torch.ones(1, 2), eps=0.0)


def two_views(seed=1):
    g = torch.Generator().manual_seed(seed)
    p1, p2 = (torch.rand(3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t1, t2 = (torch.randint(0, 2, (3, 8), generator=g).double() * 2 - 1 for _ in range(2))

    def sign(p):
        return torch.where(p >= 0.5, 1.0, -1.0).double()

    return KDInputs(s1=sign(p1), s2=sign(p2), p1=p1, p2=p2, t1=t1, t2=t2)


def test_kd_loss_distill_kl_averages_the_two_views_of_the_codes():
    x = two_views()
    expected = 0.5 * (distill_kl_loss(x.s1, x.t1) + distill_kl_loss(x.s2, x.t2))
    assert kd_loss("distill_kl", x, BRCDConfig()).item() == expected.item()


def test_kd_loss_kl_codes_needs_no_teacher_probabilities():
    x = two_views()  # q1, q2 are None
    expected = 0.5 * (kl_codes_loss(x.p1, x.t1) + kl_codes_loss(x.p2, x.t2))
    assert kd_loss("kl_codes", x, BRCDConfig()).item() == expected.item()
