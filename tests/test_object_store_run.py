"""jobs/distill.py end to end with everything on the loopback S3 store (SeaweedFS, tests/object_store.py): shards
and manifest read from data.shards_url with no local shard directory, checkpoints under an s3:// storage_path, the
k-means cache on s3://; the teacher written once beside the checkpoints, not into each. The job runs as a
separate process (its own local Ray) with the store's endpoint and keys in the standard AWS variables only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides

from brcd_dist import storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def s3_run(object_store, s3_shards, tmp_path_factory):
    storage_path = object_store.url("runs")
    cache = object_store.url("cache")
    overrides = [o for o in tiny_overrides(tmp_path_factory.mktemp("unused"), "unused", "on-s3")
                 if not o.startswith(("data.shards_dir=", "train.storage_path="))]
    overrides += [f"data.shards_dir={tmp_path_factory.getbasetemp() / 'no-such-dir'}", f"data.shards_url={s3_shards}",
                  f"train.storage_path={storage_path}", f"brcd.clustering_cache={cache}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(object_store.env, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "jobs/distill.py", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=840)
    return done, storage.join(storage_path, "on-s3"), cache


def test_distill_runs_with_shards_checkpoints_and_cache_on_s3(s3_run):
    done, _, _ = s3_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "student SSHP (student → student)" in done.stdout


def test_the_teacher_is_written_once_beside_the_checkpoints_not_into_them(s3_run):
    _, run_dir, _ = s3_run
    names = storage.listdir(run_dir)
    assert "teacher.pt" in names
    checkpoints = [n for n in names if n.startswith("checkpoint_")]
    assert checkpoints and all("teacher.pt" not in storage.listdir(storage.join(run_dir, c)) for c in checkpoints)
    snapshot = json.loads(storage.read_bytes(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
    assert snapshot["latest_checkpoint_result"]["metrics"]["stage"] == "done"


def test_the_kmeans_result_is_cached_on_s3(s3_run):
    _, _, cache = s3_run
    assert any(n.endswith(".pt") for n in storage.listdir(cache))
