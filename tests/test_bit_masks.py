"""clustering/bit_masks.py: m_kb = 1 iff |μ_kb| >= δ, empty or memberless clusters keep all bits (DESIGN §2)."""

import numpy as np
import pytest
import torch

from brcd_dist.clustering.bit_masks import bit_agreement, bit_masks, bit_masks_from_stats, cluster_bit_stats

# Cluster 0: four members whose share of +1 per bit is 4/4, 3/4, 2/4, 1/4, 0/4 -> μ = 1, .5, 0, −.5, −1.
CLUSTER0 = [[1, 1, 1, 1, -1], [1, 1, 1, -1, -1], [1, 1, -1, -1, -1], [1, -1, -1, -1, -1]]
# Cluster 1: two members that disagree on every bit -> μ = 0 everywhere. Cluster 2: no members.
CLUSTER1 = [[1, 1, 1, 1, 1], [-1, -1, -1, -1, -1]]


def hand_cluster():
    codes = torch.tensor(CLUSTER0 + CLUSTER1, dtype=torch.float32)
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    return codes, labels


def test_stats_are_per_cluster_sums_and_counts():
    sums, counts = cluster_bit_stats(*hand_cluster(), k=3)
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    assert sums.tolist() == [[4, 2, 0, -2, -4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert counts.tolist() == [4, 2, 0]


def test_bit_agreement_is_absolute_mean_code():
    sums, counts = cluster_bit_stats(*hand_cluster(), k=3)
    assert bit_agreement(sums, counts)[0].tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "delta, expected",
    [
        (0.0, [1, 1, 1, 1, 1]),
        (0.3, [1, 1, 0, 1, 1]),
        (0.5, [1, 1, 0, 1, 1]),  # |μ| == δ is kept (>=)
        (0.6, [1, 0, 0, 0, 1]),
        (1.0, [1, 0, 0, 0, 1]),
    ],
)
def test_mask_keeps_exactly_the_bits_the_cluster_agrees_on(delta, expected):
    masks, _ = bit_masks(*hand_cluster(), k=3, delta=delta)
    assert masks.dtype == torch.float32
    assert masks[0].tolist() == expected


def test_cluster_without_agreement_or_members_keeps_all_bits_and_is_counted():
    masks, n_fallback = bit_masks(*hand_cluster(), k=3, delta=0.5)
    assert masks[1].tolist() == [1, 1, 1, 1, 1]  # μ = 0 on every bit: the mask would be empty
    assert masks[2].tolist() == [1, 1, 1, 1, 1]  # no members
    assert n_fallback == 2


def test_delta_zero_needs_no_fallback_for_a_cluster_with_members():
    _, n_fallback = bit_masks(*hand_cluster(), k=3, delta=0.0)
    assert n_fallback == 1  # only the memberless cluster


def test_authors_double_where_bug_would_fail_this_spec():
    """The released mask builder: where(|μ| > δ, |μ|, 1) then where(· < δ, ·, 0) -> all zeros for δ < 1."""
    sums, counts = cluster_bit_stats(*hand_cluster(), k=3)
    mu = bit_agreement(sums, counts).numpy()[:2]
    buggy = np.where(mu > 0.5, mu, 1)
    buggy = np.where(buggy < 0.5, buggy, 0)
    assert not buggy.any()
    masks, _ = bit_masks(*hand_cluster(), k=3, delta=0.5)
    assert masks[0].tolist() == [1, 1, 0, 1, 1]
    assert not np.array_equal(masks[:2].numpy(), buggy)


def test_stats_of_shards_add_up_to_the_stats_of_the_whole():
    """What lets a distributed run all_reduce (sums, counts) and get the one-process masks."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2, (40, 16), generator=g).float() * 2 - 1
    labels = torch.randint(0, 4, (40,), generator=g)
    whole = cluster_bit_stats(codes, labels, 4)
    a = cluster_bit_stats(codes[:13], labels[:13], 4)
    b = cluster_bit_stats(codes[13:], labels[13:], 4)
    assert torch.equal(a[0] + b[0], whole[0]) and torch.equal(a[1] + b[1], whole[1])
    masks_whole, fb_whole = bit_masks_from_stats(*whole, delta=0.3)
    masks_sum, fb_sum = bit_masks_from_stats(a[0] + b[0], a[1] + b[1], delta=0.3)
    assert torch.equal(masks_whole, masks_sum) and fb_whole == fb_sum


def test_numpy_inputs_give_the_same_masks():
    codes, labels = hand_cluster()
    m_np, fb_np = bit_masks(codes.numpy(), labels.numpy(), k=3, delta=0.5)
    m_t, fb_t = bit_masks(codes, labels, k=3, delta=0.5)
    assert torch.equal(m_np, m_t) and fb_np == fb_t


def test_label_out_of_range_raises():
    codes, labels = hand_cluster()
    with pytest.raises(ValueError, match="labels must lie"):
        cluster_bit_stats(codes, labels, k=1)
