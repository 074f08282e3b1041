"""Files read from shared stores run no code: caches, clustering and model checkpoints load
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


# DeepSpeed's engine checkpoint (engine/ in every checkpoint): DeepSpeed reads it, through the checkpoint engine that
# make_engine installs (train/engine_checkpoint.py), with torch's weights-only unpickler. One gloo rank, no Ray.


def _tiny_engine(zero_stage: int, frozen: bool = False):
    from brcd_dist.train.engine import make_engine

    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed reads it (a launcher or Ray Train sets it)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    if frozen:  # a frozen first layer, as a frozen pretrained backbone
        model[0].requires_grad_(False)
    train = SimpleNamespace(batch_size=4, grad_accum=1, weight_decay=0.01, zero_stage=zero_stage, precision="fp32")
    engine = make_engine(model, train, 1e-2, torch.device("cpu"))
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def step():
        engine.backward(engine(x).pow(2).mean())
        engine.step()

    return engine, step


def _resume_matches(rank, world_size, directory: str, zero_stage: int, frozen: bool) -> tuple[bool, list]:
    """Save after one step, note the weights one step later, wander off, load, take that step again. Also returns
    the parameter names the checkpoint's module state holds (ZeRO stage 0)."""
    from pathlib import Path

    from brcd_dist.train.engine import load_engine, save_engine
    from brcd_dist.train.state import ENGINE_TAG

    engine, step = _tiny_engine(zero_stage, frozen)
    step()
    save_engine(engine, directory)
    step()
    expected = {k: v.clone() for k, v in engine.module.state_dict().items()}
    step()
    step()
    load_engine(engine, directory)
    step()
    exact = all(torch.equal(expected[k], v) for k, v in engine.module.state_dict().items())
    if not frozen:
        return exact, []
    saved = torch.load(Path(directory) / ENGINE_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return exact, sorted(saved)


def _load_crafted_engine_checkpoint(rank, world_size, directory: str, marker: str) -> str:
    from pathlib import Path

    from brcd_dist.train.state import ENGINE_TAG

    engine, step = _tiny_engine(0)
    step()
    engine.save_checkpoint(directory, tag=ENGINE_TAG)
    path = Path(directory) / ENGINE_TAG / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)  # the file this test just wrote
    state["ds_version"] = _Payload(marker)
    torch.save(state, path)
    try:
        engine.load_checkpoint(directory, tag=ENGINE_TAG)
    except pickle.UnpicklingError:
        return "refused"
    return "loaded"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, frozen", [(0, False), (1, False), (2, False), (3, False), (0, True)])
def test_engine_checkpoint_resumes_bit_exact_through_the_weights_only_loader(zero_stage, frozen, tmp_path):
    """Frozen parameters stay out of the checkpoint (train/engine.save_engine) and the resume is still exact."""
    from dist_utils import run_on_ranks

    args = (str(tmp_path / "engine"), zero_stage, frozen)
    (outcome,) = run_on_ranks(_resume_matches, 1, args=args, timeout=600)
    exact, saved = outcome.unwrap()
    assert exact is True
    if frozen:
        assert "0.weight" not in saved and "2.weight" in saved


@pytest.mark.slow
def test_crafted_deepspeed_engine_checkpoint_does_not_execute(tmp_path):
    from dist_utils import run_on_ranks

    marker = tmp_path / "PWNED"
    (outcome,) = run_on_ranks(
        _load_crafted_engine_checkpoint, 1, args=(str(tmp_path / "engine"), str(marker)), timeout=600
    )
    assert outcome.unwrap() == "refused"
    assert not marker.exists()


@pytest.mark.parametrize("name", ["x.tar; touch {m}", "$(touch {m}).tar", "x.tar {m}", "../x.tar", "-o{m}"])
def test_crafted_shard_name_in_a_manifest_is_refused_and_runs_nothing(name, tmp_path):
    """A manifest's shard names go into every reader's URL, here a pipe: base: one that is not a plain file name
    is refused before anything runs (no shell ever did; an argument or a path outside the base is refused too)."""
    from brcd_dist.data.manifest import shard_url

    marker = tmp_path / "PWNED"
    with pytest.raises(ValueError, match="shard name"):
        shard_url(name.format(m=marker), str(tmp_path), f"pipe:cat {tmp_path}/{{shard}}")
    assert not marker.exists()


def test_crafted_pickled_mlflow_model_does_not_execute(tmp_path):
    """A model in a registry without our checkpoint goes to mlflow.pytorch.load_model, which unpickles model.pth by
    default: tracking.load_model turns that off for the call."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from brcd_dist.tracking import load_model

    model_dir = tmp_path / "model"
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(model_dir), serialization_format="pickle")
    (pth,) = model_dir.rglob("model.pth")
    marker = tmp_path / "PWNED"
    torch.save(_Payload(marker), pth)
    with pytest.raises(MlflowException, match="pickle"):
        load_model(str(model_dir))
    assert not marker.exists()
