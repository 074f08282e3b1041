"""losses/brcd.py's variants against a slow loop reference written from their description, row by row,
on ±1 codes and on continuous codes (where the dot and normalised forms differ in value, so their gradients are
pinned too), plus hand values of the authors'-release mode and of the authors' negatives."""

import itertools
import math

import pytest
import torch

from brcd_dist.losses.brcd import brcd_loss

TAU = 0.3
B, L, K = 6, 8, 3


def ref_rows(
    s1,
    s2,
    t1,
    t2,
    labels,
    vc1,
    vc2,
    masks,
    *,
    alpha,
    tau,
    structural,
    cluster_removal,
    bit_mask,
    mask_normalization,
    mask_sides,
    cosine,
    negatives,
    authors_release,
):
    """The 2B row losses (view-1 rows, then view-2 rows), as loops over plain Python lists.

    A code of image j is masked by m_{c(j)} (mask_sides both) or by the anchor's m_{c(i)} (anchor); the authors'
    release masks are all zero. sim(a, z) = Σ_b ma_b mz_b a_b z_b over √(Σma·Σmz) (kept) or L (length), or the
    cosine of the masked vectors (normalised); a code masked to nothing has similarity 0 (nn.CosineSimilarity).
    Negatives: the four codes of each other image j (all), or the anchor view's student code and the other view's
    teacher code (authors); minus images with c(j) = c(i) under cluster_removal."""
    s1, s2, t1, t2 = (x.tolist() for x in (s1, s2, t1, t2))
    labels, vc1, vc2 = labels.tolist(), vc1.tolist(), vc2.tolist()
    masks = masks.tolist() if masks is not None else None
    n, bits = len(labels), len(s1[0])

    def mask_of(image):
        if authors_release:
            return [0.0] * bits
        return masks[labels[image]] if bit_mask else [1.0] * bits

    def sim(a, z, ma, mz):
        if sum(ma) == 0 or sum(mz) == 0:
            return 0.0
        num = sum(ma[b] * mz[b] * a[b] * z[b] for b in range(bits))
        if cosine == "normalised":
            na = math.sqrt(sum(ma[b] * a[b] ** 2 for b in range(bits)))
            nz = math.sqrt(sum(mz[b] * z[b] ** 2 for b in range(bits)))
            return num / max(na * nz, 1e-8)
        return num / (bits if mask_normalization == "length" else math.sqrt(sum(ma) * sum(mz)))

    def individual(a, z):
        dot = sum(a[b] * z[b] for b in range(bits))
        if cosine == "normalised":
            return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(x * x for x in z)))
        return dot / bits

    rows = []
    for view, (anchors, own, other, other_cluster) in enumerate(((s1, t1, t2, vc2), (s2, t2, t1, vc1))):
        for i in range(n):
            k = labels[i]
            m_i = mask_of(i)
            a = alpha if structural else 1.0
            if structural and cluster_removal and other_cluster[i] != k:
                a = 1.0
            pos = (a * individual(anchors[i], own[i]) + (1 - a) * sim(anchors[i], other[i], m_i, m_i)) / tau
            negs = []
            for j in range(n):
                if j == i or (cluster_removal and labels[j] == k):
                    continue
                blocks = {0: s1[j], 1: s2[j], 2: t1[j], 3: t2[j]}
                chosen = (0, 1, 2, 3) if negatives == "all" else (view, 3 - view)
                m_j = mask_of(j) if mask_sides == "both" else m_i
                for block in chosen:
                    negs.append(sim(anchors[i], blocks[block], m_i, m_j) / tau)
            rows.append(math.log(math.exp(pos) + sum(math.exp(v) for v in negs)) - pos)
    return rows


def batch(seed, continuous=False):
    """Images 0-1 in cluster 0, 2-3 in 1, 4-5 in 2; offsets fire on rows 1, 4 and B+3 (as test_loss_brcd.py).
    Masks of different sizes, so the two-sided √(|m_a||m_b|) differs from |m_a|."""
    g = torch.Generator().manual_seed(seed)
    if continuous:
        s1, s2, t1, t2 = (torch.randn(B, L, generator=g, dtype=torch.float64) for _ in range(4))
    else:
        s1, s2, t1, t2 = (torch.randint(0, 2, (B, L), generator=g).double() * 2 - 1 for _ in range(4))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    vc1 = torch.tensor([0, 0, 1, 2, 2, 2])
    vc2 = torch.tensor([0, 1, 1, 1, 0, 2])
    masks = torch.tensor(
        [[1, 1, 0, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.float64
    )
    return s1, s2, t1, t2, labels, vc1, vc2, masks


SIMILARITY = [("kept", "dot"), ("length", "dot"), ("kept", "normalised")]
VARIANTS = [
    {
        "mask_normalization": nz,
        "cosine": cos,
        "mask_sides": sides,
        "negatives": neg,
        "authors_release": ar,
        "bit_mask": bm,
    }
    for (nz, cos), sides, neg, ar, bm in itertools.product(
        SIMILARITY, ("anchor", "both"), ("all", "authors"), (False, True), (True, False)
    )
    if not (ar and not bm)
]


def variant_id(v):
    return "-".join(
        [
            v["mask_normalization"],
            v["cosine"],
            v["mask_sides"],
            v["negatives"],
            "release" if v["authors_release"] else "masks" if v["bit_mask"] else "nomask",
        ]
    )


@pytest.mark.parametrize("continuous", [False, True], ids=["pm1", "continuous"])
@pytest.mark.parametrize("structural, cluster_removal", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_row_losses_match_loop_reference(variant, structural, cluster_removal, continuous):
    args = batch(seed=11, continuous=continuous)
    kw = dict(alpha=0.6, tau=TAU, structural=structural, cluster_removal=cluster_removal, **variant)
    rows = brcd_loss(*args, reduction="none", **kw)
    expected = torch.tensor(ref_rows(*args, **kw), dtype=torch.float64)
    assert rows.shape == (2 * B,)
    assert torch.allclose(rows, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v["bit_mask"]], ids=variant_id)
def test_gradient_matches_finite_differences_of_the_reference(variant):
    """Continuous codes, float64: autograd of brcd_loss against central differences of the loop reference."""
    s1, s2, t1, t2, labels, vc1, vc2, masks = batch(seed=12, continuous=True)
    kw = dict(alpha=0.6, tau=TAU, structural=True, cluster_removal=True, **variant)
    s1.requires_grad_(True)
    brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, **kw).backward()
    h = 1e-6
    for i, b in [(0, 0), (1, 2), (3, 5), (5, 7)]:
        plus, minus = s1.detach().clone(), s1.detach().clone()
        plus[i, b] += h
        minus[i, b] -= h

        def f(x):
            return sum(ref_rows(x, s2, t1, t2, labels, vc1, vc2, masks, **kw)) / (2 * B)

        assert math.isclose(s1.grad[i, b].item(), (f(plus) - f(minus)) / (2 * h), rel_tol=1e-5, abs_tol=1e-8)


def test_defaults_are_the_design_variant():
    args = batch(seed=13)
    explicit = {
        "mask_normalization": "kept",
        "mask_sides": "anchor",
        "cosine": "dot",
        "negatives": "all",
        "authors_release": False,
    }
    assert torch.equal(
        brcd_loss(*args, alpha=0.8, tau=TAU, reduction="none"),
        brcd_loss(*args, alpha=0.8, tau=TAU, reduction="none", **explicit),
    )


def orthogonal_pair():
    s = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return s, torch.tensor([0, 1])


def test_authors_release_row_is_an_individual_pull_over_all_negatives():
    """Zero masks: structural term and every negative are 0, so a row is log(1 + n·e^{−α·cos(s_i, t_i)/τ});
    B = 2, s = t, distinct clusters: n = 4 negatives, cos 1."""
    s, labels = orthogonal_pair()
    loss = brcd_loss(s, s, s, s, labels, labels, labels, None, alpha=0.8, tau=TAU, authors_release=True)
    assert math.isclose(loss.item(), math.log(1 + 4 * math.exp(-0.8 / TAU)), rel_tol=1e-12)


def test_authors_release_with_authors_negatives_has_two_per_row():
    s, labels = orthogonal_pair()
    loss = brcd_loss(
        s, s, s, s, labels, labels, labels, None, alpha=0.8, tau=TAU, authors_release=True, negatives="authors"
    )
    assert math.isclose(loss.item(), math.log(1 + 2 * math.exp(-0.8 / TAU)), rel_tol=1e-12)


def test_authors_release_ignores_the_masks_and_the_codes_structure():
    """Masks are not read; the loss depends on the negatives only through their number."""
    s1, s2, t1, t2, labels, vc1, vc2, masks = batch(seed=14)
    kw = {"alpha": 0.8, "tau": TAU, "authors_release": True, "reduction": "none"}
    base = brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, masks, **kw)
    assert torch.equal(base, brcd_loss(s1, s2, t1, t2, labels, vc1, vc2, None, **kw))
    flipped = t2.clone()
    flipped[3] = -flipped[3]  # t'_3: row 3's structural target, a negative of other clusters' rows, row B+3's positive
    changed = (brcd_loss(s1, s2, t1, flipped, labels, vc1, vc2, masks, **kw) != base).nonzero().flatten().tolist()
    assert changed == [B + 3]


def test_authors_negatives_are_the_anchor_views_student_and_the_other_views_teacher():
    """View-1 row of image 0 under the authors' negatives: changing s'_1 or t_1 (not among {s_1, t'_1}) leaves it."""
    s1, s2, t1, t2, _, _vc1, _vc2, _masks = batch(seed=15)
    labels = torch.arange(B)
    kw = {"alpha": 0.8, "tau": TAU, "negatives": "authors", "bit_mask": False, "reduction": "none"}
    base = brcd_loss(s1, s2, t1, t2, labels, labels, labels, None, **kw)
    for x in (s2, t1):
        changed = x.clone()
        changed[1] = -changed[1]
        args = (s1, changed, t1, t2) if x is s2 else (s1, s2, changed, t2)
        assert brcd_loss(*args, labels, labels, labels, None, **kw)[0] == base[0]
    for x in (s1, t2):
        changed = x.clone()
        changed[1] = -changed[1]
        args = (changed, s2, t1, t2) if x is s1 else (s1, s2, t1, changed)
        assert brcd_loss(*args, labels, labels, labels, None, **kw)[0] != base[0]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"mask_sides": "left"}, "mask_sides='left': allowed: anchor, both"),
        ({"mask_normalization": "bits"}, "mask_normalization='bits': allowed: kept, length"),
        ({"cosine": "l2"}, "cosine='l2': allowed: dot, normalised"),
        ({"negatives": "some"}, "negatives='some': allowed: all, authors"),
        ({"cosine": "normalised", "mask_normalization": "length"}, "cosine='normalised' has its own normaliser"),
        ({"authors_release": True, "bit_mask": False}, "needs bit_mask=True"),
    ],
)
def test_bad_variant_raises_naming_value_and_allowed(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        brcd_loss(*batch(seed=16), alpha=0.8, tau=TAU, **kw)


def test_empty_mask_row_raises_under_two_sided_masks():
    args = list(batch(seed=17))
    args[-1] = args[-1].clone()
    args[-1][2] = 0
    with pytest.raises(ValueError, match="keeps no bit"):
        brcd_loss(*args, alpha=0.8, tau=TAU, mask_sides="both")
