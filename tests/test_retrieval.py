"""Retrieval metrics (DESIGN §3) against hand-made cases and a slow per-query Python reference."""

import numpy as np
import pytest
import torch

from brcd_dist.models import HashModel
from brcd_dist.retrieval import (
    encode_batches,
    evaluate_paradigms,
    hamming_distances_packed,
    hamming_topk,
    mean_average_precision,
    pack_words,
    pr_curve,
    precision_at_k,
    stable_topk_by_key,
    stable_topk_by_sort,
)

# ----------------------------------------------------------------------------- slow references


def ref_ranking(q, db):
    """Per query: database indices sorted by (Hamming distance, index)."""
    dist = [[int((qi != dj).sum()) for dj in db] for qi in q]
    return [sorted(range(len(db)), key=lambda j: (row[j], j)) for row in dist]


def ref_relevant(ql, dl):
    """One query label vs one database label: equal ints, or multi-hot rows sharing a class."""
    if np.ndim(ql) == 0:
        return ql == dl
    return bool((np.asarray(ql) * np.asarray(dl)).sum() > 0)


def ref_map(q, db, qlab, dlab, k):
    aps = []
    for i, order in enumerate(ref_ranking(q, db)):
        hits, precisions = 0, []
        for rank, j in enumerate(order[:k], start=1):
            if ref_relevant(qlab[i], dlab[j]):
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / hits if hits else 0.0)
    return float(np.mean(aps))


def tie_heavy_codes(rng, n, bits=16, pool=12):
    """Codes drawn from a small pool: many exact duplicates, and distances 0..16 shared by many items."""
    pool_codes = rng.choice([-1.0, 1.0], size=(pool, bits)).astype(np.float32)
    return pool_codes[rng.integers(0, pool, n)]


# ----------------------------------------------------------------------------- ranking

METHODS = ["popcount", "matmul"]  # the CPU path and the other-device path, both run here on the CPU


@pytest.mark.parametrize("method", METHODS)
def test_ties_are_broken_by_database_index(method):
    q = np.array([[1, 1, 1, 1]], np.float32)
    db = np.array(
        [
            [-1, -1, -1, -1],  # 0: distance 4
            [1, 1, 1, 1],  # 1: distance 0
            [1, 1, 1, -1],  # 2: distance 1
            [1, 1, 1, 1],  # 3: distance 0
            [-1, 1, 1, 1],  # 4: distance 1
            [1, 1, 1, 1],
        ],  # 5: distance 0
        np.float32,
    )
    assert hamming_topk(q, db, 6, method=method).tolist() == [[1, 3, 5, 2, 4, 0]]
    assert hamming_topk(q, db, 4, method=method).tolist() == [[1, 3, 5, 2]]


@pytest.mark.parametrize("method", METHODS)
def test_hamming_topk_matches_reference_with_many_ties_across_query_chunks(method):
    rng = np.random.default_rng(0)
    q, db = tie_heavy_codes(rng, 23), tie_heavy_codes(rng, 200)
    expected = [order[:50] for order in ref_ranking(q, db)]
    assert hamming_topk(q, db, 50, query_chunk=7, method=method).tolist() == expected
    assert hamming_topk(torch.from_numpy(q), torch.from_numpy(db), 50).dtype == np.int64


@pytest.mark.parametrize("bits", [8, 13, 24, 64, 72, 256])
def test_packed_popcount_distances_equal_bit_disagreements(bits):
    rng = np.random.default_rng(bits)
    q, db = rng.choice([-1.0, 1.0], (4, bits)), rng.choice([-1.0, 1.0], (9, bits))
    got = hamming_distances_packed(pack_words(torch.from_numpy(q)), pack_words(torch.from_numpy(db)), bits)
    np.testing.assert_array_equal(got, (q[:, None, :] != db[None, :, :]).sum(-1))


def test_both_ranking_methods_give_the_stable_order():
    """CPU: counting sort of 8/16-bit distances; other devices: topk of distance * N + index. Same order."""
    rng = np.random.default_rng(5)
    dist = rng.integers(0, 6, (9, 400))  # 400 items on 6 distances: ties everywhere
    expected = np.argsort(dist, axis=1, kind="mergesort")[:, :120]  # mergesort: stable
    np.testing.assert_array_equal(stable_topk_by_sort(dist.astype(np.uint8), 120), expected)
    np.testing.assert_array_equal(stable_topk_by_sort((dist + 300).astype(np.uint16), 120), expected)
    np.testing.assert_array_equal(stable_topk_by_key(torch.from_numpy(dist).float(), 120).numpy(), expected)


def test_topk_key_is_exact_when_it_exceeds_float32():
    """Key distance * N + index above 2^24 must not round: float32 would merge neighbouring indices."""
    rng = np.random.default_rng(1)
    n = 70_000
    dist = torch.from_numpy(rng.integers(246, 257, (3, n)).astype(np.float32))
    assert 246 * n > 1 << 24
    expected = np.argsort(dist.numpy(), axis=1, kind="stable")[:, :300]
    np.testing.assert_array_equal(stable_topk_by_key(dist, 300, max_distance=256).numpy(), expected)


def test_k_beyond_database_size_ranks_the_whole_database():
    q = np.ones((1, 8), np.float32)
    db = -np.ones((3, 8), np.float32)
    assert hamming_topk(q, db, 10).tolist() == [[0, 1, 2]]


def test_codes_that_are_not_plus_minus_one_are_refused():
    with pytest.raises(ValueError, match="±1"):
        hamming_topk(np.zeros((1, 8)), np.ones((2, 8)), 1)


# ----------------------------------------------------------------------------- mAP@K, P@K


@pytest.mark.parametrize("method", METHODS)
def test_map_matches_reference_on_tie_heavy_int_labels(method):
    rng = np.random.default_rng(2)
    q, db = tie_heavy_codes(rng, 30), tie_heavy_codes(rng, 250)
    ql, dl = rng.integers(0, 5, 30), rng.integers(0, 5, 250)
    for k in (1, 10, 100, 250):
        got = mean_average_precision(q, db, ql, dl, k, query_chunk=4, method=method)
        assert got == pytest.approx(ref_map(q, db, ql, dl, k), abs=1e-12)


def test_map_matches_reference_on_tie_heavy_multi_hot_labels():
    rng = np.random.default_rng(3)
    q, db = tie_heavy_codes(rng, 30), tie_heavy_codes(rng, 250)
    ql = (rng.random((30, 6)) < 0.2).astype(np.int64)  # some rows all zero: never relevant
    dl = (rng.random((250, 6)) < 0.2).astype(np.int64)
    assert (ql.sum(1) == 0).any() and (dl.sum(1) == 0).any()
    for k in (5, 60):
        got = mean_average_precision(q, db, ql, dl, k, query_chunk=9)
        assert got == pytest.approx(ref_map(q, db, ql, dl, k), abs=1e-12)


def test_ap_divides_by_relevant_items_retrieved_in_top_k():
    """Ranking rel = [0, 1, 0, 1] (ties by index): AP@4 = (1/2 + 2/4) / 2 = 0.5, though 3 items are relevant."""
    q = np.ones((1, 4), np.float32)
    db = np.ones((5, 4), np.float32)  # all at distance 0: order = index order
    dl = np.array([7, 0, 7, 0, 0])
    assert mean_average_precision(q, db, np.array([0]), dl, 4) == pytest.approx(0.5)


def test_query_with_no_relevant_item_in_top_k_scores_zero():
    q = np.ones((2, 4), np.float32)
    db = np.ones((3, 4), np.float32)
    dl = np.array([0, 1, 2])
    # query 0 (label 0): item 0 ranked first -> AP 1; query 1 (label 2): item 2 is third, outside top 2 -> AP 0
    assert mean_average_precision(q, db, np.array([0, 2]), dl, 2) == pytest.approx(0.5)
    assert mean_average_precision(q, db, np.array([9, 9]), dl, 3) == 0.0


def test_precision_at_k_matches_reference():
    rng = np.random.default_rng(4)
    q, db = tie_heavy_codes(rng, 20), tie_heavy_codes(rng, 120)
    ql, dl = rng.integers(0, 4, 20), rng.integers(0, 4, 120)
    expected = np.mean([np.mean([ql[i] == dl[j] for j in order[:15]]) for i, order in enumerate(ref_ranking(q, db))])
    assert precision_at_k(q, db, ql, dl, 15, query_chunk=6) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- precision-recall by radius


@pytest.mark.parametrize("method", METHODS)
def test_pr_curve_by_hamming_radius_hand_computed(method):
    q = np.array([[1, 1, 1, 1]], np.float32)
    db = np.array(
        [
            [1, 1, 1, 1],  # distance 0, relevant
            [1, 1, 1, -1],  # distance 1, not relevant
            [-1, 1, 1, 1],  # distance 1, relevant
            [-1, -1, -1, -1],
        ],  # distance 4, relevant
        np.float32,
    )
    pr = pr_curve(q, db, np.array([0]), np.array([0, 1, 0, 0]), method=method)
    assert pr["radius"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(pr["precision"], [1, 2 / 3, 2 / 3, 2 / 3, 3 / 4])
    np.testing.assert_allclose(pr["recall"], [1 / 3, 2 / 3, 2 / 3, 2 / 3, 1])


def test_pr_curve_averages_only_queries_where_each_value_is_defined():
    q = np.array([[1, 1, 1, 1], [1, 1, -1, -1]], np.float32)  # query 1: label 5, relevant to nothing
    db = np.array(
        [
            [1, 1, 1, -1],  # distance 1 / 1, relevant to query 0
            [-1, -1, -1, -1],
        ],  # distance 4 / 2
        np.float32,
    )
    pr = pr_curve(q, db, np.array([0, 5]), np.array([0, 1]))
    # radius 0: nothing retrieved by either query -> undefined; radius 1: query 0 -> 1, query 1 -> 0
    assert np.isnan(pr["precision"][0])
    np.testing.assert_allclose(pr["precision"][1:], [1 / 2, 1 / 2, 1 / 2, 1 / 4])
    # recall: query 1 has no relevant item, so only query 0 counts
    np.testing.assert_allclose(pr["recall"], [0, 1, 1, 1, 1])


# ----------------------------------------------------------------------------- paradigms, encoding


def test_evaluate_paradigms_routes_student_and_teacher_codes():
    """DB labels [0, 1, 1], query label 0, mAP@3: the position of item 0 in each ranking gives the answer."""
    sq = np.array([[1, 1, 1, 1]], np.float32)
    student_db = np.array([[-1, -1, -1, -1], [1, 1, 1, 1], [1, 1, 1, -1]], np.float32)  # ranks 1, 2, 0
    teacher_db = np.array([[1, 1, 1, 1], [-1, 1, 1, 1], [-1, -1, 1, 1]], np.float32)  # ranks 0, 1, 2
    tq = np.array([[-1, 1, 1, 1]], np.float32)  # teacher db distances 1, 0, 1: ranks 1, 0, 2 (tie by index)
    codes = {"student": {"query": sq, "database": student_db}, "teacher": {"query": tq, "database": teacher_db}}
    got = evaluate_paradigms(codes, np.array([0]), np.array([0, 1, 1]), 3)
    assert got == pytest.approx({"sshp": 1 / 3, "ashp": 1.0, "teacher": 1 / 2})
    del codes["teacher"]["query"]
    assert set(evaluate_paradigms(codes, np.array([0]), np.array([0, 1, 1]), 3)) == {"sshp", "ashp"}


def test_encode_batches_concatenates_codes_keys_and_labels_in_order():
    torch.manual_seed(0)
    model = HashModel("mobilenetv3_small_050", 16, in_chans=1, img_size=32)
    images = torch.randn(5, 1, 32, 32)
    batches = [
        {"image": images[:3], "key": ["a", "b", "c"], "label": torch.tensor([0, 1, 2])},
        {"image": images[3:], "key": ["d", "e"], "label": torch.tensor([3, 4])},
    ]
    codes, keys, labels = encode_batches(model, batches, "cpu")
    assert codes.dtype == np.float32 and codes.shape == (5, 16)
    np.testing.assert_array_equal(codes, model.encode(images).numpy())
    assert keys == ["a", "b", "c", "d", "e"]
    assert labels.tolist() == [0, 1, 2, 3, 4]
