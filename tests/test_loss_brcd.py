"""losses/brcd.py against DESIGN §2, row by row: a slow loop reference, then each rule on the rows it must change."""

import itertools
import math

import pytest
import torch

from brcd_dist.codes import probs_and_codes
from brcd_dist.losses.brcd import brcd_loss

TAU = 0.3
B, L, K = 6, 8, 3


def ref_rows(s1, s2, t1, t2, labels, vc1, vc2, masks, alpha, tau, structural, cluster_removal, bit_mask):
    """DESIGN §2 written as loops over plain Python lists: the 2B row losses (view-1 rows, then view-2 rows)."""
    s1, s2, t1, t2, masks = (x.tolist() for x in (s1, s2, t1, t2, masks))
    labels, vc1, vc2 = labels.tolist(), vc1.tolist(), vc2.tolist()
    n, bits = len(labels), len(s1[0])
    rows = []
    # view 1: anchor s_i, own-view teacher t_i, other view t'_i; view 2: anchor s'_i, with t_i and t'_i swapped.
    for anchors, own, other, other_cluster in ((s1, t1, t2, vc2), (s2, t2, t1, vc1)):
        for i in range(n):
            k = labels[i]
            m = masks[k] if bit_mask else [1.0] * bits

            def cos_k(a, z):
                return sum(m[b] * a[b] * z[b] for b in range(bits)) / sum(m)

            def cos(a, z):
                return sum(a[b] * z[b] for b in range(bits)) / bits

            a = alpha if structural else 1.0
            if structural and cluster_removal and other_cluster[i] != k:  # offset positive
                a = 1.0
            pos = (a * cos(anchors[i], own[i]) + (1 - a) * cos_k(anchors[i], other[i])) / tau
            negs = []
            for j in range(n):
                if j == i or (cluster_removal and labels[j] == k):
                    continue
                for z in (s1[j], s2[j], t1[j], t2[j]):
                    negs.append(cos_k(anchors[i], z) / tau)
            rows.append(math.log(math.exp(pos) + sum(math.exp(v) for v in negs)) - pos)
    return rows


def codes(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).double() * 2 - 1


def batch(seed=0):
    """Random ±1 codes with chosen clusters: images 0-1 in cluster 0, 2-3 in 1, 4-5 in 2; the views of images
    1 and 4 (view 2) and 3 (view 1) fall into other clusters, so the offset rule fires on rows 1, 4 and B+3."""
    s1, s2, t1, t2 = (codes(B, L, seed=seed + i) for i in range(4))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    vc1 = torch.tensor([0, 0, 1, 2, 2, 2])
    vc2 = torch.tensor([0, 1, 1, 1, 0, 2])
    masks = torch.tensor(
        [[1, 1, 0, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.float64
    )
    return s1, s2, t1, t2, labels, vc1, vc2, masks


SWITCHES = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("structural, cluster_removal, bit_mask", SWITCHES)
def test_row_losses_match_loop_reference(alpha, structural, cluster_removal, bit_mask):
    args = batch(seed=10)
    flags = dict(structural=structural, cluster_removal=cluster_removal, bit_mask=bit_mask)
    rows = brcd_loss(*args, alpha=alpha, tau=TAU, reduction="none", **flags)
    expected = ref_rows(*args, alpha, TAU, **flags)
    assert rows.shape == (2 * B,)
    assert torch.allclose(rows, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert math.isclose(brcd_loss(*args, alpha=alpha, tau=TAU, **flags).item(), sum(expected) / (2 * B), rel_tol=1e-12)


def test_hand_value_positive_is_in_the_denominator():
    """B = 2, no masks, α = 1: each row has positive cos 1 and four negatives of cos 0 -> log(1 + 4e^{−1/τ})."""
    s = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    loss = brcd_loss(s, s, s, s, labels, labels, labels, None, alpha=1.0, tau=TAU, bit_mask=False)
    assert math.isclose(loss.item(), math.log(1 + 4 * math.exp(-1 / TAU)), rel_tol=1e-12)


def test_offset_positive_sets_alpha_to_one_on_exactly_its_row():
    s1, s2, t1, t2, labels, _, _, masks = batch(seed=20)
    t1[2], t2[2] = s1[2], -s1[2]  # row 2: individual cos 1, structural cos_k −1, so α matters
    agree = labels.clone()
    vc2 = labels.clone()
    vc2[2] = 0  # view 2 of image 2 drifts out of c(2) = 1: only the view-1 row of image 2 uses cluster(t'_2)
    kw = dict(alpha=0.8, tau=TAU, reduction="none")
    base = brcd_loss(s1, s2, t1, t2, labels, agree, agree, masks, **kw)
    offset = brcd_loss(s1, s2, t1, t2, labels, agree, vc2, masks, **kw)
    alpha_one = brcd_loss(s1, s2, t1, t2, labels, agree, agree, masks, alpha=1.0, tau=TAU, reduction="none")
    changed = (offset != base).nonzero().flatten().tolist()
    assert changed == [2]
    assert offset[2] == alpha_one[2]


def test_offset_positive_of_view_one_changes_only_the_view_two_row():
    s1, s2, t1, t2, labels, _, _, masks = batch(seed=21)
    t2[3], t1[3] = s2[3], -s2[3]  # row B+3: individual cos 1, structural cos_k −1, so α matters
    agree = labels.clone()
    vc1 = labels.clone()
    vc1[3] = 0
    kw = dict(alpha=0.8, tau=TAU, reduction="none")
    base = brcd_loss(s1, s2, t1, t2, labels, agree, agree, masks, **kw)
    offset = brcd_loss(s1, s2, t1, t2, labels, vc1, agree, masks, **kw)
    assert (offset != base).nonzero().flatten().tolist() == [B + 3]


def test_offset_rule_is_off_without_cluster_removal():
    s1, s2, t1, t2, labels, vc1, vc2, masks = batch(seed=22)
    kw = dict(alpha=0.8, tau=TAU, cluster_removal=False, reduction="none")
    assert torch.equal(
        brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, **kw),
        brcd_loss(s1, s2, t1, t2, labels, labels, labels, masks, **kw),
    )


def test_false_negative_removal_changes_exactly_the_rows_of_shared_clusters():
    """Only images 0 and 1 share a cluster: their four rows lose negatives (loss drops), all others are unchanged."""
    s1, s2, t1, t2, _, _, _, masks = batch(seed=30)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    masks = torch.ones(5, L, dtype=torch.float64)
    # views agree with their image's cluster, so the offset rule never fires: only removal differs
    kw = dict(alpha=0.8, tau=TAU, reduction="none")
    on = brcd_loss(s1, s2, t1, t2, labels, labels, labels, masks, cluster_removal=True, **kw)
    off = brcd_loss(s1, s2, t1, t2, labels, labels, labels, masks, cluster_removal=False, **kw)
    changed = (on != off).nonzero().flatten().tolist()
    assert changed == [0, 1, B, B + 1]
    assert bool((on[changed] < off[changed]).all())


def test_row_with_no_negatives_left_has_zero_loss_and_counts_in_the_mean():
    """One cluster holds every image: removal empties every denominator but the positive, so each row is
    −log(e^pos / e^pos) = 0 exactly, and the mean over the 2B rows is 0."""
    s1, s2, t1, t2, _, _, _, masks = batch(seed=40)
    everyone = torch.zeros(B, dtype=torch.long)
    kw = dict(alpha=0.8, tau=TAU)
    rows = brcd_loss(s1, s2, t1, t2, everyone, everyone, everyone, masks, reduction="none", **kw)
    assert torch.equal(rows, torch.zeros(2 * B, dtype=torch.float64))
    assert brcd_loss(s1, s2, t1, t2, everyone, everyone, everyone, masks, **kw).item() == 0.0
    kept = brcd_loss(s1, s2, t1, t2, everyone, everyone, everyone, masks, cluster_removal=False, **kw)
    assert kept.item() > 0


def test_structural_off_equals_alpha_one():
    args = batch(seed=50)
    off = brcd_loss(*args, alpha=0.3, tau=TAU, structural=False, reduction="none")
    one = brcd_loss(*args, alpha=1.0, tau=TAU, reduction="none")
    assert torch.equal(off, one)


def test_bit_mask_off_equals_all_ones_masks():
    s1, s2, t1, t2, labels, vc1, vc2, _ = batch(seed=60)
    ones = torch.ones(K, L, dtype=torch.float64)
    a = brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, None, alpha=0.8, tau=TAU, bit_mask=False)
    b = brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, ones, alpha=0.8, tau=TAU, bit_mask=True)
    assert torch.allclose(a, b, rtol=1e-14)


def test_individual_term_uses_all_bits():
    """α = 1: flipping t_0 on bit 2, which cluster 0's mask hides, must move row 0 (t_0 is only its positive)."""
    s1, s2, t1, t2, labels, vc1, vc2, masks = batch(seed=70)
    assert masks[0, 2] == 0 and labels[0] == 0 and vc2[0] == 0
    kw = dict(alpha=1.0, tau=TAU, reduction="none")
    base = brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, **kw)
    t1[0, 2] = -t1[0, 2]
    assert brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, **kw)[0] != base[0]


def test_structural_term_uses_the_anchor_clusters_mask():
    """α = 0: flipping t'_0 on bit 2, hidden by cluster 0's mask, leaves row 0 unchanged."""
    s1, s2, t1, t2, labels, vc1, vc2, masks = batch(seed=71)
    kw = dict(alpha=0.0, tau=TAU, reduction="none")
    base = brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, **kw)
    unmasked = brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, bit_mask=False, **kw)
    t2[0, 2] = -t2[0, 2]
    assert brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, **kw)[0] == base[0]
    assert brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, bit_mask=False, **kw)[0] != unmasked[0]


def test_teacher_codes_get_no_gradient_and_students_do():
    s1, s2, t1, t2, labels, vc1, vc2, masks = batch(seed=80)
    for x in (s1, s2, t1, t2):
        x.requires_grad_(True)
    brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, alpha=0.8, tau=TAU).backward()
    assert t1.grad is None and t2.grad is None
    assert s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0


def test_gradient_reaches_student_logits_through_probs_and_codes():
    """STE chain rule: ∂loss/∂logits = ∂loss/∂s · σ'(logits), checked against the gradient w.r.t. s as a leaf."""
    _, _, t1, t2, labels, vc1, vc2, masks = batch(seed=90)
    g = torch.Generator().manual_seed(91)
    logits1 = torch.randn(B, L, generator=g, dtype=torch.float64, requires_grad=True)
    logits2 = torch.randn(B, L, generator=g, dtype=torch.float64, requires_grad=True)
    p1, s1 = probs_and_codes(logits1)
    p2, s2 = probs_and_codes(logits2)
    brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, alpha=0.8, tau=TAU).backward()

    leaf1, leaf2 = s1.detach().requires_grad_(True), s2.detach().requires_grad_(True)
    brcd_loss(leaf1, leaf2, t1, t2, labels, vc1, vc2, masks, alpha=0.8, tau=TAU).backward()
    assert logits1.grad.abs().sum() > 0
    assert torch.allclose(logits1.grad, leaf1.grad * (p1 * (1 - p1)).detach(), rtol=1e-12)
    assert torch.allclose(logits2.grad, leaf2.grad * (p2 * (1 - p2)).detach(), rtol=1e-12)


def test_loss_is_smooth_in_the_codes_despite_removed_negatives():
    """gradcheck in float64, treating codes as continuous: the −inf fill of removed negatives yields no NaN."""
    s1, s2, t1, t2, labels, vc1, vc2, masks = batch(seed=100)
    labels = torch.tensor([0, 0, 0, 0, 0, 1])

    def f(a, b):
        return brcd_loss(a, b, t1, t2, labels, vc1, vc2, masks, alpha=0.8, tau=TAU)

    assert torch.autograd.gradcheck(f, (s1.requires_grad_(True), s2.requires_grad_(True)))


def test_full_size_batch_runs_vectorised():
    """B = 256, L = 256 (the largest sizes the config allows) forward and backward, finite."""
    g = torch.Generator().manual_seed(0)
    n, bits, k = 256, 256, 10
    logits = torch.randn(2, n, bits, generator=g, requires_grad=True)
    _, s = probs_and_codes(logits)
    t = torch.randint(0, 2, (2, n, bits), generator=g).float() * 2 - 1
    labels, vc1, vc2 = (torch.randint(0, k, (n,), generator=g) for _ in range(3))
    masks = (torch.rand(k, bits, generator=g) > 0.5).float()
    loss = brcd_loss(s[0], s[1], t[0], t[1], labels, vc1, vc2, masks, alpha=0.8, tau=TAU)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bad_arguments_raise():
    args = batch()
    with pytest.raises(ValueError, match="reduction"):
        brcd_loss(*args, alpha=0.8, tau=TAU, reduction="sum")
    with pytest.raises(ValueError, match="needs masks"):
        brcd_loss(*args[:-1], None, alpha=0.8, tau=TAU)
