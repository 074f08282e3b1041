"""losses/cibhash.py: NT-Xent over the 2B codes + kl_weight × symmetric Bernoulli KL (Qiu et al. 2021)."""

import math

import torch

from brcd_dist.losses.cibhash import bernoulli_kl, cibhash_loss, nt_xent_loss

EPS = 1e-8


def ref_nt_xent(z1, z2, tau):
    """Slow reference: row r's positive is the other view of its image; all other rows but r are negatives."""
    z = z1.tolist() + z2.tolist()
    b, n = len(z1), 2 * len(z1)

    def cos(u, v):
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    total = 0.0
    for r in range(n):
        pos = (r + b) % n
        denom = sum(math.exp(cos(z[r], z[c]) / tau) for c in range(n) if c != r)
        total += -(cos(z[r], z[pos]) / tau - math.log(denom))
    return total / n


def ref_kl(p, q):
    """Σ_bits KL(Bern(p) ‖ Bern(q)), mean over rows, with the authors' ε."""
    rows = [
        sum(
            a * (math.log(a + EPS) - math.log(b + EPS)) + (1 - a) * (math.log(1 - a + EPS) - math.log(1 - b + EPS))
            for a, b in zip(pr, qr)
        )
        for pr, qr in zip(p.tolist(), q.tolist())
    ]
    return sum(rows) / len(rows)


def random_batch(b=5, bits=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    p1, p2 = (
        torch.rand(b, bits, generator=g, dtype=torch.float64),
        torch.rand(b, bits, generator=g, dtype=torch.float64),
    )
    return p1, torch.where(p1 >= 0.5, 1.0, -1.0).double(), p2, torch.where(p2 >= 0.5, 1.0, -1.0).double()


def test_nt_xent_hand_value_for_identical_views():
    """Row r: positive cos 1, two negatives cos 0 -> −log(e^{1/τ} / (e^{1/τ} + 2)) = log(1 + 2e^{−1/τ})."""
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    tau = 0.3
    assert math.isclose(nt_xent_loss(z, z.clone(), tau).item(), math.log(1 + 2 * math.exp(-1 / tau)), rel_tol=1e-6)


def test_cibhash_loss_matches_loop_reference():
    p1, s1, p2, s2 = random_batch()
    expected = ref_nt_xent(s1, s2, 0.3) + 0.001 * 0.5 * (ref_kl(p1, p2) + ref_kl(p2, p1))
    assert math.isclose(cibhash_loss(p1, s1, p2, s2, tau=0.3, kl_weight=0.001).item(), expected, rel_tol=1e-10)


def test_kl_weight_scales_only_the_kl_term():
    p1, s1, p2, s2 = random_batch(seed=1)
    kl = 0.5 * (ref_kl(p1, p2) + ref_kl(p2, p1))
    diff = cibhash_loss(p1, s1, p2, s2, kl_weight=0.5) - cibhash_loss(p1, s1, p2, s2, kl_weight=0.0)
    assert math.isclose(diff.item(), 0.5 * kl, rel_tol=1e-10)


def test_kl_is_zero_for_equal_probabilities():
    p = torch.tensor([[0.1, 0.5, 0.9]])
    assert abs(bernoulli_kl(p, p).item()) < 1e-7


def test_kl_target_side_is_detached_as_in_the_authors_code():
    """∂/∂p1 comes only from ½·KL(p1 ‖ sg p2): (log p1 − log p2 − log(1−p1) + log(1−p2)) / (2B), up to ε."""
    p1 = torch.tensor([[0.2, 0.7], [0.6, 0.4]], dtype=torch.float64, requires_grad=True)
    p2 = torch.tensor([[0.5, 0.9], [0.3, 0.4]], dtype=torch.float64)
    s = torch.ones(2, 2, dtype=torch.float64)
    cibhash_loss(p1, s, p2, s, kl_weight=1.0).backward()
    d = p1.detach()
    expected = (torch.log(d) - torch.log(p2) - torch.log(1 - d) + torch.log(1 - p2)) / (2 * 2)
    assert torch.allclose(p1.grad, expected, atol=1e-6)
