"""assign_nearest / nearest_centroids: the nearest-centroid lookup that gives an augmented view's code its cluster."""

import numpy as np
import pytest
import torch

from brcd_dist.clustering.pseudo_labels import assign_nearest, nearest_centroids


def _data(seed=0, n=300, k=17, d=12):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)


def test_labels_are_the_argmin_of_exact_distances():
    """Reference: float64 brute force. Random Gaussians have no near ties, so float32 scores must agree."""
    x, c = _data()
    ref = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    got = assign_nearest(torch.from_numpy(x), torch.from_numpy(c))
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), ref)


def test_distance_is_the_squared_l2_distance_to_the_chosen_centroid():
    x, c = _data(1)
    labels, dist = nearest_centroids(x, c)
    ref = ((x.astype(np.float64) - c[labels.numpy()].astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(dist.numpy(), ref, rtol=1e-5, atol=1e-4)


def test_ties_go_to_the_lowest_centroid_index():
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    c = torch.tensor([[5.0, 5.0], [1.0, 1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]])
    assert assign_nearest(x, c).tolist() == [1, 3]


def test_spherical_picks_the_largest_cosine_not_the_smallest_distance():
    """x = (1, 0): c0 = (3, 0) has cosine 1 but L2 distance 4; c1 = (0.9, 0.3) is at distance 0.1, cosine 0.95."""
    x = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[3.0, 0.0], [0.9, 0.3]])
    assert assign_nearest(x, c).tolist() == [1]
    assert assign_nearest(x, c, spherical=True).tolist() == [0]


def test_chunked_and_unchunked_agree():
    x, c = _data(2, n=1000)
    np.testing.assert_array_equal(assign_nearest(x, c, chunk_size=7).numpy(), assign_nearest(x, c).numpy())


def test_numpy_codes_are_accepted_and_no_rows_give_no_labels():
    codes = np.where(np.random.default_rng(3).random((20, 16)) < 0.5, -1.0, 1.0).astype(np.float32)
    labels = assign_nearest(codes, codes[:4])
    assert labels.shape == (20,) and labels[:4].tolist() == [0, 1, 2, 3]  # each centroid is its own nearest code
    assert assign_nearest(np.zeros((0, 16), np.float32), codes[:4]).shape == (0,)


def test_pseudo_labels_are_a_mapping_kept_as_two_sorted_arrays():
    from brcd_dist.clustering.pseudo_labels import PseudoLabels

    given = {"train-00002": 3, "train-00000": 1, "img-é": 0, "b": 2}
    p = PseudoLabels(given.keys(), given.values())
    assert p == given and dict(p) == given and len(p) == 4 and "b" in p and "c" not in p
    assert p.lookup(["b", "missing", "img-é"]).tolist() == [2, -1, 0]
    with pytest.raises(KeyError):
        p["missing"]


def test_pseudo_labels_survive_a_weights_only_file_and_read_a_dict_of_before(tmp_path):
    from brcd_dist.clustering.pseudo_labels import PseudoLabels

    p = PseudoLabels([f"k{i}" for i in range(1000)], [i % 7 for i in range(1000)])
    torch.save(p.to_stored(), tmp_path / "p.pt")
    back = PseudoLabels.of(torch.load(tmp_path / "p.pt", weights_only=True))
    assert back == p and back.lookup(["k999", "k0"]).tolist() == [999 % 7, 0]
    assert PseudoLabels.of({"a": 1}) == {"a": 1} and len(PseudoLabels.of(PseudoLabels([], []).to_stored())) == 0
