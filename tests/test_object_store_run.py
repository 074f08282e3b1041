"""jobs/distill.py end to end with everything on the loopback S3 store (SeaweedFS, tests/object_store.py): shards
and manifest read from data.shards_url with no local shard directory, checkpoints under an s3:// storage_path, the
k-means cache on s3://; the teacher written once beside the checkpoints, not into each. Then the same run with the
shards read through a link that cuts every connection after 30 kB: it finishes with the same student. The jobs run
as separate processes (their own local Ray) with the store's endpoint and keys in the standard AWS variables only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides
from object_store import CuttingProxy

from brcd_dist import storage
from brcd_dist.models import load_hash_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _distill(object_store, s3_shards, tmp_path_factory, name: str, extra: list[str], endpoint: str = ""):
    overrides = [
        o
        for o in tiny_overrides(tmp_path_factory.mktemp("unused"), "unused", name)
        if not o.startswith(("data.shards_dir=", "train.storage_path="))
    ]
    overrides += [
        f"data.shards_dir={tmp_path_factory.getbasetemp() / 'no-such-dir'}",
        f"data.shards_url={s3_shards}",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(object_store.env, PYTHONPATH=str(REPO))
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return subprocess.run(
        [sys.executable, "jobs/distill.py", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )


def _final_student(run_dir: str):
    snapshot = json.loads(storage.read_bytes(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
    return load_hash_model(
        storage.join(run_dir, snapshot["latest_checkpoint_result"]["checkpoint_dir_name"], "student.pt")
    )


@pytest.fixture(scope="module")
def s3_run(object_store, s3_shards, tmp_path_factory):
    storage_path = object_store.url("runs")
    cache = object_store.url("cache")
    done = _distill(
        object_store,
        s3_shards,
        tmp_path_factory,
        "on-s3",
        [f"train.storage_path={storage_path}", f"brcd.clustering_cache={cache}"],
    )
    return done, storage.join(storage_path, "on-s3"), cache


@pytest.fixture(scope="module")
def cut_run(object_store, s3_shards, tmp_path_factory):
    """The same run (local storage, no cache) with every s3 read through a link that cuts each connection."""
    storage_path = tmp_path_factory.mktemp("cut_runs")
    proxy = CuttingProxy(int(object_store.endpoint.rsplit(":", 1)[1]), cut_after=30_000).start()
    try:
        done = _distill(
            object_store,
            s3_shards,
            tmp_path_factory,
            "through-cuts",
            [f"train.storage_path={storage_path}"],
            endpoint=proxy.endpoint,
        )
    finally:
        proxy.stop()
    return done, str(storage_path / "through-cuts"), proxy


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


def test_a_run_reading_through_a_cutting_link_finishes_with_the_fault_free_student(s3_run, cut_run):
    done, run_dir, proxy = cut_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert proxy.cuts >= 10  # the link really did drop connections, many times
    assert "samples skipped" not in done.stdout + done.stderr  # the readers lost nothing (ReadStats warning)
    clean, cut = _final_student(s3_run[1]).state_dict(), _final_student(run_dir).state_dict()
    assert all(torch.equal(clean[k], cut[k]) for k in clean)
