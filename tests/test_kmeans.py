"""distributed_kmeans: distributed Lloyd equals one-process Lloyd, matches FAISS, and fails loudly on every rank.

The 2-rank tests run real gloo processes (tests/dist_utils.py). To keep the file fast, one spawn of 2 ranks runs
every 2-rank case (the bad inputs last); each test then checks one behaviour of those runs.
Data are on a 1/64 grid (or ±1 codes), so every float64 sum is exact and "equal" can mean bit-for-bit.
"""

import logging

import faiss
import numpy as np
import pytest
import torch
from dist_utils import run_on_ranks

from brcd_dist.clustering.kmeans import distributed_kmeans

K = 8
# FAISS >= 1.13 stops once its objective no longer changes; the comparisons below want every iteration.
FAISS_NO_EARLY_STOP = (
    {"early_stop_threshold": -1.0} if hasattr(faiss.ClusteringParameters(), "early_stop_threshold") else {}
)


def grid_blobs(n=600, d=6, k=K, seed=0):
    """Gaussian blobs rounded to multiples of 1/64: float64 sums of these are exact in any order."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(k, d))
    x = centers[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    return (np.round(x * 64) / 64).astype(np.float32)


def pm1_codes(n=400, bits=32, k=6, flip=0.1, seed=1):
    """±1 codes: k random prototypes with each bit flipped with probability `flip`."""
    rng = np.random.default_rng(seed)
    protos = np.where(rng.random((k, bits)) < 0.5, -1.0, 1.0)
    x = protos[rng.integers(k, size=n)] * np.where(rng.random((n, bits)) < flip, -1.0, 1.0)
    return x.astype(np.float32)


X = grid_blobs()
INIT = X[np.random.default_rng(5).choice(len(X), K, replace=False)]
CODES = pm1_codes()
# Two far-away centroids that no point is nearest to: both clusters are empty after the first assignment.
SPLIT_X = np.array([[9, 10], [11, 10], [10, 9], [10, 11], [-10, 0], [-10, 2]], dtype=np.float32)
SPLIT_INIT = np.array([[10, 10], [-10, 1], [100, 100], [-100, 100]], dtype=np.float32)

# name -> (data, where rank 0's shard ends, kwargs)
CASES = {
    "equal": (X, 300, dict(k=K, iters=8, tol=0.0, init=INIT)),
    "uneven": (X, 137, dict(k=K, iters=8, tol=0.0, init=INIT)),
    "rank0_empty": (X, 0, dict(k=K, iters=8, tol=0.0, init=INIT)),
    "kmeans++": (X, 211, dict(k=K, iters=8, tol=0.0, seed=3)),
    "random_init": (X, 211, dict(k=K, iters=8, tol=0.0, seed=3, init="random")),
    "codes_kmeans++_spherical": (CODES, 250, dict(k=6, iters=6, tol=0.0, seed=4, spherical=True)),
    "split": (SPLIT_X, 3, dict(k=4, iters=1, tol=0.0, init=SPLIT_INIT)),
}


def _shard(x, cut, rank):
    return x[:cut] if rank == 0 else x[cut:]


def _run_cases(rank, world_size):
    return {name: distributed_kmeans(_shard(x, cut, rank), **kw) for name, (x, cut, kw) in CASES.items()}


def _one_process(name):
    x, _, kw = CASES[name]
    return distributed_kmeans(x, **kw)


def _run_all(rank, world_size):
    return _run_cases(rank, world_size), _run_bad_cases(rank, world_size)


@pytest.fixture(scope="module")
def two_rank_runs():
    """[(results of CASES, error messages of the bad cases) of rank 0, the same of rank 1]"""
    return [o.unwrap() for o in run_on_ranks(_run_all, 2, timeout=180)]


@pytest.fixture(scope="module")
def two_ranks(two_rank_runs):
    """{case: [result of rank 0, result of rank 1]}"""
    return {name: [two_rank_runs[0][0][name], two_rank_runs[1][0][name]] for name in CASES}


def assert_same_as_one_process(name, two_ranks):
    one = _one_process(name)
    r0, r1 = two_ranks[name]
    np.testing.assert_array_equal(r0.centroids, one.centroids)
    np.testing.assert_array_equal(r1.centroids, one.centroids)
    np.testing.assert_array_equal(np.concatenate([r0.assignments, r1.assignments]), one.assignments)
    # The inertia is a float64 sum of float32 distances, summed per rank first: equal up to float64 rounding.
    np.testing.assert_allclose(r0.inertia, one.inertia, rtol=1e-12)
    assert r0.inertia == r1.inertia
    assert (r0.iterations, r0.n_splits) == (one.iterations, one.n_splits)


# ----------------------------------------------------------------------------- 2 ranks == 1 process


def test_two_equal_shards_equal_one_process_on_the_concatenation(two_ranks):
    assert_same_as_one_process("equal", two_ranks)


def test_two_uneven_shards_equal_one_process_on_the_concatenation(two_ranks):
    assert_same_as_one_process("uneven", two_ranks)


def test_a_rank_without_data_changes_nothing(two_ranks):
    assert two_ranks["rank0_empty"][0].assignments.shape == (0,)
    assert_same_as_one_process("rank0_empty", two_ranks)


def test_kmeanspp_init_does_not_depend_on_the_number_of_ranks(two_ranks):
    assert_same_as_one_process("kmeans++", two_ranks)
    x, _, kw = CASES["kmeans++"]
    init_1 = distributed_kmeans(x, **{**kw, "iters": 0}).centroids
    assert len({tuple(c) for c in init_1}) == K  # D² sampling never picks a chosen point twice
    assert all(any((c == p).all() for p in x) for c in init_1)  # the seeds are data points


def test_random_init_does_not_depend_on_the_number_of_ranks(two_ranks):
    assert_same_as_one_process("random_init", two_ranks)


def test_spherical_kmeans_on_pm1_codes_does_not_depend_on_the_number_of_ranks(two_ranks):
    assert_same_as_one_process("codes_kmeans++_spherical", two_ranks)


def test_empty_cluster_split_is_the_same_on_two_ranks(two_ranks):
    assert two_ranks["split"][0].n_splits == 2
    assert_same_as_one_process("split", two_ranks)


# ----------------------------------------------------------------------------- against FAISS


def test_inertia_matches_faiss_kmeans_with_the_same_init():
    """FAISS sums its objective in float32, so the two agree to ~1e-6 relative; no cluster empties here (checked on
    both sides), so the FAISS random split never comes into play."""
    ours = distributed_kmeans(X, K, iters=12, tol=0.0, init=INIT)
    km = faiss.Kmeans(
        X.shape[1], K, niter=12, max_points_per_centroid=len(X), min_points_per_centroid=1, **FAISS_NO_EARLY_STOP
    )
    km.train(X, init_centroids=INIT)
    assert ours.n_splits == 0 and all(s["nsplit"] == 0 for s in km.iteration_stats)
    assert len(km.obj) == 12
    np.testing.assert_allclose(ours.inertia[:12], km.obj, rtol=1e-5)
    np.testing.assert_allclose(ours.centroids, km.centroids, rtol=0, atol=1e-5)


def test_spherical_inertia_matches_faiss_spherical_kmeans():
    """FAISS's spherical objective is Σ x·c; with unit-norm centroids Σ||x - c||² = Σ||x||² + n - 2 Σ x·c."""
    init = CODES[[0, 1, 2, 3, 4, 7]]
    ours = distributed_kmeans(CODES, 6, iters=5, tol=0.0, init=init, spherical=True)
    km = faiss.Kmeans(
        CODES.shape[1],
        6,
        niter=5,
        spherical=True,
        max_points_per_centroid=len(CODES),
        min_points_per_centroid=1,
        **FAISS_NO_EARLY_STOP,
    )
    km.train(CODES, init_centroids=init)
    assert ours.n_splits == 0 and all(s["nsplit"] == 0 for s in km.iteration_stats)
    assert len(km.obj) == 5
    expected = (CODES.astype(np.float64) ** 2).sum() + len(CODES) - 2 * np.asarray(km.obj)
    np.testing.assert_allclose(ours.inertia[:5], expected, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours.centroids, axis=1), 1.0, rtol=1e-6)


def test_torch_backend_gives_the_same_clustering_as_faiss_backend():
    a = distributed_kmeans(X, K, iters=6, tol=0.0, init=INIT, backend="faiss-cpu")
    b = distributed_kmeans(X, K, iters=6, tol=0.0, init=INIT, backend="torch-cpu")
    assert (a.backend, b.backend) == ("faiss-cpu", "torch-cpu")
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch-cuda", "faiss-gpu"])
def test_gpu_backends_give_the_same_clustering_as_faiss_cpu(backend):
    if backend == "faiss-gpu" and faiss.get_num_gpus() == 0:
        pytest.skip("FAISS without GPU support")
    a = distributed_kmeans(X, K, iters=6, tol=0.0, init=INIT, backend="faiss-cpu")
    b = distributed_kmeans(torch.from_numpy(X).cuda(), K, iters=6, tol=0.0, init=INIT, backend=backend)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)  # grid data: exact float64 sums in any order
    np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-6)


def test_the_backend_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="brcd_dist.clustering.kmeans"):
        res = distributed_kmeans(X, K, iters=1, init=INIT)
    assert any(res.backend in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- Lloyd's loop


def test_assignments_are_the_nearest_of_the_returned_centroids():
    res = distributed_kmeans(X, K, iters=3, tol=0.0, init=INIT)
    d2 = ((X[:, None, :].astype(np.float64) - res.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(res.assignments, d2.argmin(1))
    assert res.inertia[-1] == pytest.approx(d2.min(1).sum(), rel=1e-6)
    assert len(res.inertia) == res.iterations + 1 == 4


def test_centroids_are_the_float64_means_of_the_previous_assignment():
    one = distributed_kmeans(X, K, iters=1, tol=0.0, init=INIT)
    labels = ((X[:, None, :].astype(np.float64) - INIT[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    means = np.stack([X[labels == j].astype(np.float64).mean(0) for j in range(K)]).astype(np.float32)
    np.testing.assert_array_equal(one.centroids, means)


def test_stops_when_the_relative_inertia_change_is_below_tol():
    tol = 1e-3
    res = distributed_kmeans(X, K, iters=50, tol=tol, init=INIT)
    changes = [abs(a - b) / a for a, b in zip(res.inertia, res.inertia[1:])]
    assert res.iterations < 50
    assert changes[-1] < tol and all(c >= tol for c in changes[:-1])


def test_runs_all_iterations_when_tol_is_zero():
    assert distributed_kmeans(X, K, iters=15, tol=0.0, init=INIT).iterations == 15


def test_empty_clusters_take_half_of_the_largest_cluster():
    """SPLIT_X: 4 points around (10, 10), 2 around (-10, 1); centroids 2 and 3 are far from every point.
    After the update, cluster 2 splits cluster 0 (4 points, the largest): c2 = c0·(1+ε, 1-ε), c0 <- c0·(1-ε, 1+ε),
    2 points each; then cluster 3 splits the first of the largest (cluster 0 again, 2 points, ties with 1 and 2)."""
    eps = 1 / 1024
    res = distributed_kmeans(SPLIT_X, 4, iters=1, tol=0.0, init=SPLIT_INIT)
    c0 = np.array([10.0, 10.0])
    plus, minus = np.array([1 + eps, 1 - eps]), np.array([1 - eps, 1 + eps])
    expected = np.stack([c0 * minus * minus, [-10.0, 1.0], c0 * plus, c0 * minus * plus]).astype(np.float32)
    np.testing.assert_allclose(res.centroids, expected, rtol=1e-7)
    assert res.n_splits == 2
    # the split centroids now share the 4 points: (9,10) and (10,11) lean to c0's side, (11,10) and (10,9) to c2's;
    # c3 sits at the middle, farther from every point than one of those two
    assert res.assignments.tolist() == [0, 2, 2, 0, 1, 1]


def test_split_is_deterministic():
    a = distributed_kmeans(SPLIT_X, 4, iters=3, tol=0.0, init=SPLIT_INIT)
    b = distributed_kmeans(SPLIT_X, 4, iters=3, tol=0.0, init=SPLIT_INIT)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_spherical_centroids_are_unit_norm_means():
    res = distributed_kmeans(CODES, 6, iters=20, tol=1e-9, seed=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, rtol=1e-6)
    for j in range(6):  # at convergence each centroid is the normalised mean of its members
        m = CODES[res.assignments == j].astype(np.float64).mean(0)
        np.testing.assert_allclose(res.centroids[j], m / np.linalg.norm(m), atol=1e-6)


# ----------------------------------------------------------------------------- bad input: every rank raises

BAD = {  # name -> rank -> (x, k)
    "k_too_large": lambda r: (X[:20] if r == 0 else X[20:30], 31),
    "k_below_2": lambda r: (X[:20], 1),
    "dim_mismatch": lambda r: (X[:20, :5] if r == 0 else X[20:40], 3),
    "nan_on_rank_1": lambda r: (X[:20] if r == 0 else np.where(np.arange(20)[:, None] == 7, np.nan, X[20:40]), 3),
}
BAD_MESSAGES = {
    "k_too_large": "k=31 is larger than the number of points (30",
    "k_below_2": "need at least 2 clusters",
    "dim_mismatch": "the dimension d must be the same",
    "nan_on_rank_1": "NaN or Inf on rank(s) [1]",
}


def _run_bad_cases(rank, world_size):
    out = {}
    cases = {name: (*make(rank), {}) for name, make in BAD.items()}
    cases["bad_tol_on_rank_1"] = (X[:20], 3, {"tol": -1.0} if rank == 1 else {})
    for name, (x, k, kw) in cases.items():
        try:
            distributed_kmeans(x, k, iters=2, **kw)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def two_ranks_bad(two_rank_runs):
    """[{bad case: error message or None} of rank 0, the same of rank 1]"""
    return [two_rank_runs[0][1], two_rank_runs[1][1]]


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_the_same_clear_error_on_every_rank(name, two_ranks_bad):
    msgs = [two_ranks_bad[0][name], two_ranks_bad[1][name]]
    assert msgs[0] is not None and msgs[0] == msgs[1]
    assert BAD_MESSAGES[name] in msgs[0]


def test_a_bad_argument_on_one_rank_raises_on_every_rank(two_ranks_bad):
    assert "tol=-1.0: must be >= 0" in two_ranks_bad[1]["bad_tol_on_rank_1"]
    assert "bad argument on rank(s) [1]" in two_ranks_bad[0]["bad_tol_on_rank_1"]


def test_bad_input_raises_in_one_process_too():
    with pytest.raises(ValueError, match="need at least 2 clusters"):
        distributed_kmeans(X[:20], 1)
    with pytest.raises(ValueError, match="k=21 is larger than the number of points"):
        distributed_kmeans(X[:20], 21)
    with pytest.raises(ValueError, match="NaN or Inf"):
        distributed_kmeans(np.full((20, 3), np.inf, np.float32), 3)
    with pytest.raises(ValueError, match="must be 2-D"):
        distributed_kmeans(X[0], 3)
