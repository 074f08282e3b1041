"""KD baselines (losses/individual.py, relational.py, crd.py, kl_bits.py) and the kd_loss dispatch."""

import math

import pytest
import torch

from brcd_dist.config import BRCDConfig
from brcd_dist.losses import (
    KDInputs,
    brcd_loss,
    crd_loss,
    individual_cos_loss,
    individual_l2_loss,
    kd_loss,
    kd_names,
    kl_bits_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
)

TAU = 0.3


def codes(n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, bits), generator=g).double() * 2 - 1


def smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ----------------------------------------------------------------------------- hand values


def test_individual_cos_hand_value():
    s = torch.tensor([[1.0, 1, 1, 1], [1.0, -1, 1, -1]])
    t = torch.tensor([[1.0, 1, 1, -1], [1.0, -1, 1, -1]])  # cos 1/2 and 1
    assert math.isclose(individual_cos_loss(s, t).item(), (0.5 + 0.0) / 2)


def test_individual_l2_hand_value():
    u = torch.tensor([[0.5, -0.5]])
    t = torch.tensor([[1.0, 1.0]])
    assert math.isclose(individual_l2_loss(u, t).item(), (0.5**2 + 1.5**2) / 2)


def test_crd_hand_value():
    """Orthogonal codes: each row has its positive at cos 1 and one in-batch negative at cos 0."""
    s = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    assert math.isclose(crd_loss(s, s, TAU).item(), math.log(1 + math.exp(-1 / TAU)), rel_tol=1e-12)


def test_crd_matches_row_reference():
    """Row i: −log softmax over the teacher codes t_j of the batch of cos(s_i, t_j)/τ, at j = i; mean over rows."""
    s, t = codes(4, 8, seed=1), codes(4, 8, seed=2)
    rows = []
    for i in range(4):
        logits = [sum(a * b for a, b in zip(s[i].tolist(), t[j].tolist())) / 8 / TAU for j in range(4)]
        rows.append(math.log(sum(math.exp(v) for v in logits)) - logits[i])
    assert math.isclose(crd_loss(s, t, TAU).item(), sum(rows) / 4, rel_tol=1e-12)


def test_kl_bits_hand_value_is_teacher_to_student():
    p = torch.tensor([[0.5]], dtype=torch.float64)
    q = torch.tensor([[0.9]], dtype=torch.float64)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(q ‖ p), not KL(p ‖ q)
    assert math.isclose(kl_bits_loss(p, q).item(), expected, rel_tol=1e-6)


def test_pkt_hand_value():
    """Student e1, e2: kernel [[1, .5], [.5, 1]] -> rows (2/3, 1/3). Teacher e1, e1: kernel all 1 -> rows (1/2, 1/2).
    Loss = mean over the 4 entries of pt·log(pt/ps) = ¼·2·½(log(3/4) + log(3/2)) = ¼·log(9/8)."""
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert math.isclose(pkt_loss(s, t).item(), 0.25 * math.log(9 / 8), rel_tol=1e-5)


def test_sp_hand_value():
    """Student Gram I (rows stay I); teacher Gram all-ones -> rows (1/√2, 1/√2). Σ diff² / B² = (2 − √2) / 2."""
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert math.isclose(sp_loss(s, t).item(), (2 - math.sqrt(2)) / 2, rel_tol=1e-12)


def test_rkd_hand_value():
    """Student: right isosceles triangle (0,0), (1,0), (0,1); teacher: collinear (0,0), (1,0), (2,0).
    Distances over their mean positive distance: student (1, 1, √2)·3/(2+√2), teacher (1, 2, 1)·3/4.
    Angle cosines at vertices 0, 1, 2: student 0, √2/2, √2/2; teacher 1, −1, 1. Smooth-L1 means over the
    9 distance entries and 27 angle entries (entries on a vertex's own point are 0 for both)."""
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    ds = [x * 3 / (2 + math.sqrt(2)) for x in (1, 1, math.sqrt(2))]  # pairs (0,1), (0,2), (1,2)
    dt = [x * 3 / 4 for x in (1, 2, 1)]
    distance = 2 * sum(smooth_l1(a - b) for a, b in zip(ds, dt)) / 9
    cs = [0.0, math.sqrt(2) / 2, math.sqrt(2) / 2]
    ct = [1.0, -1.0, 1.0]
    angle = 2 * sum(smooth_l1(a - b) for a, b in zip(cs, ct)) / 27  # (i, k) and (k, i) at each vertex
    assert math.isclose(rkd_loss(s, t).item(), 25 * distance + 50 * angle, rel_tol=1e-9)


def test_rkd_is_scale_invariant():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert rkd_loss(s, 2 * s).item() < 1e-12


def test_rkd_gradient_is_finite_when_codes_repeat():
    """±1 codes often repeat: zero differences must give zero (not 1/eps or NaN) gradients."""
    s = torch.cat([codes(3, 8, seed=3)] * 2).requires_grad_(True)
    rkd_loss(s, codes(6, 8, seed=4)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 10


# ----------------------------------------------------------------------------- student equals teacher


@pytest.mark.parametrize(
    "loss", [individual_cos_loss, individual_l2_loss, rkd_loss, pkt_loss, sp_loss], ids=lambda f: f.__name__
)
def test_zero_when_student_equals_teacher(loss):
    t = codes(6, 16, seed=5)
    assert abs(loss(t.clone(), t).item()) < 1e-9


def test_kl_bits_zero_when_probabilities_match():
    q = torch.rand(4, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert abs(kl_bits_loss(q.clone(), q).item()) < 1e-7


def test_crd_is_lowest_when_student_equals_teacher():
    t = codes(6, 16, seed=7)
    best = crd_loss(t.clone(), t, TAU)
    for seed in range(8, 12):
        assert crd_loss(codes(6, 16, seed=seed), t, TAU) > best


# ----------------------------------------------------------------------------- kd_loss dispatch


def kd_batch(b=6, bits=16, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p1, p2, q1, q2 = (torch.rand(b, bits, generator=g, dtype=torch.float64) for _ in range(4))

    def sign(p):
        return torch.where(p >= 0.5, 1.0, -1.0).double()

    labels, vc1, vc2 = (torch.randint(0, k, (b,), generator=g) for _ in range(3))
    masks = (torch.rand(k, bits, generator=g) > 0.3).double()
    masks[:, 0] = 1
    return KDInputs(
        s1=sign(p1),
        s2=sign(p2),
        p1=p1,
        p2=p2,
        t1=sign(q1),
        t2=sign(q2),
        q1=q1,
        q2=q2,
        labels=labels,
        view_clusters1=vc1,
        view_clusters2=vc2,
        masks=masks,
    )


@pytest.mark.parametrize("name", kd_names())
def test_every_kd_method_gives_a_finite_scalar(name):
    v = kd_loss(name, kd_batch(), BRCDConfig())
    assert v.shape == () and torch.isfinite(v)


def test_none_is_zero():
    assert kd_loss("none", kd_batch(), BRCDConfig()).item() == 0.0


def test_brcd_dispatch_passes_the_config():
    x = kd_batch()
    cfg = BRCDConfig(alpha=0.3, tau=0.5, structural=True, cluster_removal=False, bit_mask=True)
    expected = brcd_loss(
        x.s1,
        x.s2,
        x.t1,
        x.t2,
        x.labels,
        x.view_clusters1,
        x.view_clusters2,
        x.masks,
        alpha=0.3,
        tau=0.5,
        structural=True,
        cluster_removal=False,
        bit_mask=True,
    )
    assert kd_loss("brcd", x, cfg).item() == expected.item()


def test_single_batch_baselines_average_the_two_views():
    x = kd_batch()
    expected = 0.5 * (sp_loss(x.s1, x.t1) + sp_loss(x.s2, x.t2))
    assert kd_loss("sp", x, BRCDConfig()).item() == expected.item()


def test_individual_l2_compares_the_relaxed_code():
    x = kd_batch()
    expected = 0.5 * (((2 * x.p1 - 1 - x.t1) ** 2).mean() + ((2 * x.p2 - 1 - x.t2) ** 2).mean())
    assert math.isclose(kd_loss("individual_l2", x, BRCDConfig()).item(), expected.item(), rel_tol=1e-12)


def test_kl_bits_compares_probabilities():
    x = kd_batch()
    expected = 0.5 * (kl_bits_loss(x.p1, x.q1) + kl_bits_loss(x.p2, x.q2))
    assert kd_loss("kl_bits", x, BRCDConfig()).item() == expected.item()


def test_unknown_method_and_missing_inputs_raise():
    x = kd_batch()
    with pytest.raises(ValueError, match="unknown method"):
        kd_loss("hinton", x, BRCDConfig())
    x.q1 = None
    with pytest.raises(ValueError, match="q1"):
        kd_loss("kl_bits", x, BRCDConfig())
    x.masks = None
    with pytest.raises(ValueError, match="masks"):
        kd_loss("brcd", x, BRCDConfig())
    assert torch.isfinite(kd_loss("brcd", x, BRCDConfig(bit_mask=False)))
