"""Shard writing by Ray tasks (write_shards with ray_address, jobs/make_shards.py --ray): the same shards and
manifest as the serial writer, to a local directory or the bucket, and a re-run after a crash writes only the
shards that were not recorded as finished."""

import json

import numpy as np
import pytest
from PIL import Image

from brcd_dist import storage
from brcd_dist.data import load_manifest, write_shards
from brcd_dist.data import shards as shards_module
from brcd_dist.data.shards import PROGRESS_NAME

pytestmark = pytest.mark.slow
KW = dict(seed=0, train_per_class=3, val_fraction=0.5, samples_per_shard=5, in_chans=3, shorter_side=24, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(8):
            arr = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.{'png' if i % 3 == 0 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def serial(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    return out, write_shards(out, "imagefolder", str(folder), **KW)


def test_ray_tasks_write_the_serial_writers_shards_and_manifest(local_ray, folder, serial, tmp_path):
    parallel = write_shards(tmp_path / "parallel", "imagefolder", str(folder), **KW, ray_address="auto")
    assert parallel.to_json() == serial[1].to_json()
    assert all((tmp_path / "parallel" / f).read_bytes() == (serial[0] / f).read_bytes() for f in parallel.sha256)
    assert not (tmp_path / "parallel" / PROGRESS_NAME).exists()  # a finished run leaves no progress record


def test_ray_tasks_read_an_image_folder_from_the_bucket(local_ray, object_store, folder, serial, tmp_path):
    """data.source=object_store_folder with --ray: each task reads its shard's images from the store (any node)."""
    prefix = object_store.url("ray_folder")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(str(path), storage.join(prefix, str(path.relative_to(folder))))
    parallel = write_shards(tmp_path / "from_bucket", "object_store_folder", prefix, **KW, ray_address="auto")
    assert parallel.sha256 == serial[1].sha256
    assert {n: s.keys for n, s in parallel.splits.items()} == {n: s.keys for n, s in serial[1].splits.items()}


def test_ray_tasks_write_to_the_bucket(local_ray, object_store, folder, serial):
    url = object_store.url("ray_shards")
    parallel = write_shards(url, "imagefolder", str(folder), **KW, ray_address="auto")
    assert parallel.to_json() == serial[1].to_json()
    assert load_manifest(url).to_json() == parallel.to_json()
    assert all(storage.read_bytes(storage.join(url, f)) == (serial[0] / f).read_bytes() for f in parallel.sha256)


def test_a_rerun_after_a_crash_writes_only_the_unfinished_shards(local_ray, folder, serial, tmp_path, monkeypatch):
    """The driver dies after recording 4 finished shards (its next progress write fails); the re-run keeps those 4
    and writes every other shard, and ends with the serial writer's manifest."""
    out = tmp_path / "s"
    real_write, recorded = storage.write_bytes, []

    def dying_write(uri, data):
        if uri.endswith(PROGRESS_NAME) and len(recorded) == 4:
            raise ConnectionError("driver lost")
        real_write(uri, data)
        if uri.endswith(PROGRESS_NAME):
            recorded.append(json.loads(data)["sha256"])

    monkeypatch.setattr(storage, "write_bytes", dying_write)
    with pytest.raises(ConnectionError):
        write_shards(out, "imagefolder", str(folder), **KW, ray_address="auto")
    monkeypatch.setattr(storage, "write_bytes", real_write)
    kept = recorded[-1]
    assert len(kept) == 4 and not (out / "manifest.json").exists()
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("*.tar")}
    again = write_shards(out, "imagefolder", str(folder), **KW, ray_address="auto")
    assert again.to_json() == serial[1].to_json()
    rewritten = {f.name for f in out.glob("*.tar") if mtimes.get(f.name) != f.stat().st_mtime_ns}
    assert rewritten == set(again.sha256) - set(kept)


def test_ray_writes_imagefolders_only(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"data.source='fashion_mnist': --ray is for imagefolder, object_store_folder \(images a task reads by",
    ):
        shards_module.write_shards(tmp_path, "fashion_mnist", "/nowhere", ray_address="auto")
