"""ITQ / PCA-sign / LSH (brcd_dist.itq): the properties Gong & Lazebnik's algorithm guarantees, and that it
retrieves clustered data better than chance."""

import numpy as np
import pytest

from brcd_dist.itq import fit_itq, fit_lsh, fit_pca_sign, itq_encode, quantisation_loss, random_rotation
from brcd_dist.retrieval import mean_average_precision


def clustered(n_per_class=60, classes=6, dim=40, spread=0.6, seed=0):
    """Gaussian blobs around random centres: labels are recoverable from the geometry."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 2.0
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    return x.astype(np.float32), labels


def test_rotation_is_orthogonal():
    x, _ = clustered()
    r = fit_itq(x, bits=16, iters=10).rotation
    np.testing.assert_allclose(r.T @ r, np.eye(16), atol=1e-10)
    np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-10)


def test_random_rotation_is_orthogonal_and_seeded():
    r = random_rotation(12, seed=3)
    np.testing.assert_allclose(r.T @ r, np.eye(12), atol=1e-12)
    np.testing.assert_array_equal(r, random_rotation(12, seed=3))
    assert not np.allclose(r, random_rotation(12, seed=4))


def test_quantisation_loss_never_increases():
    """Both alternating steps minimise ||B - VR||_F² exactly (sign, then Procrustes), so the sequence is
    non-increasing up to float rounding; it also starts at or below the loss of the random initial rotation."""
    x, _ = clustered(dim=30)
    model = fit_itq(x, bits=16, iters=50, seed=1)
    losses = np.array(model.losses)
    assert len(losses) == 50
    assert np.all(np.diff(losses) <= 1e-9 * losses[0])
    v = (x.astype(np.float64) - model.mean) @ model.components
    assert losses[0] <= quantisation_loss(v, random_rotation(16, seed=1)) + 1e-9
    assert losses[-1] < losses[0]  # it does move on this data
    np.testing.assert_allclose(quantisation_loss(v, model.rotation), losses[-1], rtol=1e-9)


@pytest.mark.parametrize(
    "fit",
    [lambda x: fit_itq(x, 8, iters=5), lambda x: fit_pca_sign(x, 8), lambda x: fit_lsh(x, 8)],
    ids=["itq", "pca_sign", "lsh"],
)
def test_codes_are_plus_minus_one_float32(fit):
    x, _ = clustered()
    model = fit(x)
    codes = itq_encode(model, x)
    assert codes.dtype == np.float32 and codes.shape == (len(x), 8)
    assert set(np.unique(codes)) <= {-1.0, 1.0}


def test_zero_projection_encodes_as_plus_one():
    x, _ = clustered()
    model = fit_pca_sign(x, 8)
    codes = itq_encode(model, model.mean[None, :])  # the mean projects to exactly 0 on every bit
    np.testing.assert_array_equal(codes, np.ones((1, 8), np.float32))


def test_itq_beats_random_codes_on_clustered_data():
    x, labels = clustered()
    q, db = np.arange(0, len(x), 6), np.setdiff1d(np.arange(len(x)), np.arange(0, len(x), 6))
    model = fit_itq(x[db], bits=16, iters=50)
    itq_map = mean_average_precision(itq_encode(model, x[q]), itq_encode(model, x[db]), labels[q], labels[db], 50)
    rng = np.random.default_rng(0)
    rand = lambda n: rng.choice([-1.0, 1.0], size=(n, 16)).astype(np.float32)  # noqa: E731
    rand_map = mean_average_precision(rand(len(q)), rand(len(db)), labels[q], labels[db], 50)
    assert itq_map > 0.8
    assert rand_map < 0.35  # chance: about 1/6 relevant
    assert itq_map > rand_map + 0.4


def test_itq_is_deterministic_for_a_seed():
    x, _ = clustered()
    a, b = fit_itq(x, 16, seed=7), fit_itq(x, 16, seed=7)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    np.testing.assert_array_equal(itq_encode(a, x), itq_encode(b, x))
    assert not np.array_equal(fit_itq(x, 16, seed=8).rotation, a.rotation)


def test_pca_sign_has_identity_rotation_and_matches_sign_of_projection():
    x, _ = clustered()
    model = fit_pca_sign(x, 8)
    np.testing.assert_array_equal(model.rotation, np.eye(8))
    expected = np.where((x - x.mean(0)) @ model.components >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(itq_encode(model, x), expected)


def test_too_many_bits_is_refused():
    x, _ = clustered(dim=10)
    with pytest.raises(ValueError, match="bits=16"):
        fit_itq(x, 16)
