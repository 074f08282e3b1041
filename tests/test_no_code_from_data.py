"""Files read from shared stores run no code (issue 13 point 2): caches, clustering and model checkpoints load
with weights_only=True, and a checkpoint's model spec is checked before timm sees it. A marker file proves that a
crafted pickle payload did not execute."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brcd_dist.models import HashModel, check_spec, load_hash_model, save_hash_model
from brcd_dist.train.state import Clustering
from brcd_dist.train.teacher_cache import load_cached, save_cached


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(tmp_path, obj_around):
    marker = tmp_path / "PWNED"
    path = tmp_path / "crafted.pt"
    torch.save(obj_around(_Payload(marker)), path)
    return path, marker


def test_crafted_teacher_cache_file_does_not_execute(tmp_path):
    path, marker = _crafted(tmp_path, lambda p: {"codes": p, "labels": torch.zeros(2)})
    with pytest.raises(pickle.UnpicklingError):
        load_cached(SimpleNamespace(is_chief=True), path)
    assert not marker.exists()


def test_crafted_clustering_file_does_not_execute(tmp_path):
    path, marker = _crafted(tmp_path, lambda p: {"centroids": p})
    with pytest.raises(pickle.UnpicklingError):
        Clustering.load(path)
    assert not marker.exists()


def test_crafted_model_checkpoint_does_not_execute(tmp_path):
    path, marker = _crafted(tmp_path, lambda p: {"format": "brcd-dist/hash-model/v1", "spec": p})
    with pytest.raises(pickle.UnpicklingError):
        load_hash_model(path)
    assert not marker.exists()


def test_codes_cache_keeps_numpy_arrays_through_a_weights_only_file(tmp_path):
    ctx = SimpleNamespace(is_chief=True)
    codes, labels = np.sign(np.random.default_rng(0).standard_normal((5, 16))).astype(np.float32), np.arange(5)
    path = tmp_path / "codes.pt"
    save_cached(ctx, {"codes": codes, "labels": labels, "n": 5}, path)
    back = load_cached(ctx, path)
    assert isinstance(back["codes"], np.ndarray) and np.array_equal(back["codes"], codes)
    assert back["labels"].dtype == np.int64 and back["n"] == 5
    assert set(back) == {"codes", "labels", "n"}


def test_clustering_round_trips_through_a_weights_only_file(tmp_path):
    c = Clustering(
        centroids=torch.ones(2, 8),
        masks=torch.ones(2, 8),
        agreement=torch.ones(2, 8),
        counts=torch.tensor([3, 4]),
        pseudo_labels={"train-00001": 1},
        inertia=[1.5, 1.2],
        n_mask_fallback=0,
        backend="faiss",
    )
    c.save(tmp_path / "clustering.pt")
    back = Clustering.load(tmp_path / "clustering.pt")
    assert back.pseudo_labels == {"train-00001": 1} and torch.equal(back.counts, c.counts)


@pytest.fixture(scope="module")
def good_spec():
    return HashModel("resnet10t", 16, 1, 32).spec


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "os.system"}, "arch='os.system' is not a timm model name"),
        ({"img_size": 100000}, "img_size=100000 is not in 8..4096"),
        ({"backbone_kwargs": {"img_size": 32, "pretrained_cfg_overlay": {"file": "/etc/passwd"}}}, "backbone_kwargs="),
        ({"bits": "64"}, "bits='64' is not a multiple of 8"),
        ({"extra": 1}, "keys ["),
    ],
)
def test_bad_checkpoint_spec_is_refused_before_timm(good_spec, change, message):
    with pytest.raises(ValueError, match="model spec") as err:
        check_spec({**good_spec, **change}, "ckpt.pt")
    assert message in str(err.value)


def test_saved_model_spec_passes_the_check(tmp_path):
    model = HashModel("resnet10t", 16, 1, 32)
    save_hash_model(model, tmp_path / "m.pt")
    assert load_hash_model(tmp_path / "m.pt").spec == model.spec
