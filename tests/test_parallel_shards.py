"""Shard writing by Ray tasks (parallel_shards.py): the same shards and manifest as the serial writer, and a re-run
after a crash writes only the shards that were not finished."""

import json

import numpy as np
import pytest
from PIL import Image

from brcd_dist.data import load_manifest, write_shards
from brcd_dist.data.parallel_shards import PROGRESS_NAME, write_shards_parallel

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


def test_ray_tasks_write_the_serial_writers_shards_and_manifest(local_ray, folder, tmp_path):
    serial = write_shards(tmp_path / "serial", "imagefolder", str(folder), **KW)
    parallel = write_shards_parallel(tmp_path / "parallel", str(folder), **KW)
    assert parallel.to_json() == serial.to_json()


def test_a_rerun_after_a_crash_writes_only_the_unfinished_shards(local_ray, folder, tmp_path):
    out = tmp_path / "s"
    first = write_shards_parallel(out, str(folder), **KW)
    (out / "manifest.json").unlink()  # the crash came before the manifest...
    lost = first.splits["database"].shards[1]
    (out / lost).unlink()  # ... and with this shard's file missing
    lines = (out / PROGRESS_NAME).read_text().splitlines()
    (out / PROGRESS_NAME).write_text("\n".join(ln for ln in lines if lost not in ln) + "\n")
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("*.tar")}
    again = write_shards_parallel(out, str(folder), **KW)
    assert again.to_json() == first.to_json() and load_manifest(out).digest() == first.digest()
    assert {f.name for f in out.glob("*.tar") if mtimes.get(f.name) != f.stat().st_mtime_ns} == {lost}
    rows = [json.loads(ln) for ln in (out / PROGRESS_NAME).read_text().splitlines()[1:]]
    assert [r["name"] for r in rows].count(lost) == 1
