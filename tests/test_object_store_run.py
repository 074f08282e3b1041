"""A run end to end with its shards read through a link that cuts every connection after 30 kB (shards and
manifest from data.shards_url on the loopback S3 store, SeaweedFS, tests/object_store.py; no local shard
directory): it finishes with the fault-free run's student, bit for bit. It runs on the session's Ray with
train.s3_endpoint naming the cutting proxy, which the workers apply themselves (train/worker.py), as on any Ray
the caller started.

The fault-free run with shards, checkpoints and k-means cache all on s3:// is the README's object-store recipe,
which tests/test_job_submit.py submits to the two-node cluster as a user types it (endpoint and keys in the
standard AWS variables; teacher once beside the checkpoints, cache on the bucket: checked there); the fault-free
student compared with here is conftest's uninterrupted tiny run, which reads the same shards from a local
directory."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import torch
from conftest import DEFAULT_CONFIG, tiny_overrides
from object_store import CuttingProxy

from brcd_dist import storage
from brcd_dist.driver import read_outputs, result_checkpoint_dir
from brcd_dist.models import load_hash_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _final_student(run_dir: str):
    snapshot = json.loads(storage.read_bytes(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
    return load_hash_model(
        storage.join(run_dir, snapshot["latest_checkpoint_result"]["checkpoint_dir_name"], "student.pt")
    )


@pytest.fixture(scope="module")
def cut_run(local_ray, object_store, s3_shards, tmp_path_factory):
    """The tiny run (local storage, no cache) on the session's Ray, every s3 read of its workers through a link
    that cuts each connection."""
    from brcd_dist.config import load_config
    from brcd_dist.driver import absolute_paths, launch

    storage_path = tmp_path_factory.mktemp("cut_runs")
    proxy = CuttingProxy(int(object_store.endpoint.rsplit(":", 1)[1]), cut_after=30_000).start()
    overrides = [
        o
        for o in tiny_overrides(tmp_path_factory.mktemp("unused"), storage_path, "through-cuts", max_failures=1)
        if not o.startswith("data.shards_dir=")
    ]
    overrides += [
        f"data.shards_dir={tmp_path_factory.getbasetemp() / 'no-such-dir'}",
        f"data.shards_url={s3_shards}",
        f"train.s3_endpoint={proxy.endpoint}",
    ]
    try:
        launch(absolute_paths(load_config(DEFAULT_CONFIG, overrides)))
    finally:
        proxy.stop()
    return str(storage_path / "through-cuts"), proxy


def test_a_run_reading_through_a_cutting_link_finishes_with_the_fault_free_student(cut_run, uninterrupted_run):
    """Bit-equal students also mean that the readers lost and repeated no sample: every batch was the same."""
    run_dir, proxy = cut_run
    assert proxy.cuts >= 10  # the link really did drop connections, many times
    clean = read_outputs(result_checkpoint_dir(uninterrupted_run.result)).student.state_dict()
    cut = _final_student(run_dir).state_dict()
    assert clean.keys() == cut.keys() and all(torch.equal(clean[k], cut[k]) for k in clean)


def test_a_training_shard_gone_for_good_fails_stage_b_naming_it_and_the_run_succeeds_with_it_back(
    local_ray, object_store, s3_shards, tmp_path_factory
):
    """Stage B's teacher codes must cover every training key: with one training shard gone from the bucket the run
    fails naming it, and neither the k-means cache nor any checkpoint holds a clustering; with the shard back the
    same run (same name, same cache) finishes. On the session's Ray, the teacher as given (stage A off) and two
    student steps, so that both runs together cost about a minute, less than one tiny run."""
    from brcd_dist.config import load_config
    from brcd_dist.data.manifest import load_manifest
    from brcd_dist.driver import absolute_paths, launch

    tag = uuid.uuid4().hex[:6]
    copy = object_store.url(f"gone-run-{tag}")
    for name in storage.listdir(s3_shards):
        storage.write_bytes(storage.join(copy, name), storage.read_bytes(storage.join(s3_shards, name)))
    victim = load_manifest(s3_shards).splits["train"].shards[0]
    kept = storage.read_bytes(storage.join(copy, victim))
    storage.remove(storage.join(copy, victim))
    cache = object_store.url(f"gone-cache-{tag}")
    overrides = [
        o
        for o in tiny_overrides(tmp_path_factory.mktemp("unused"), object_store.url("gone_runs"), f"gone-{tag}")
        if not o.startswith(("data.shards_dir=", "train.teacher_epochs=", "train.epochs="))
    ]
    overrides += [
        f"data.shards_dir={tmp_path_factory.getbasetemp() / 'no-such-dir'}",
        f"data.shards_url={copy}",
        f"train.teacher_cache={cache}",
        "train.teacher_epochs=0",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
    ]
    cfg = absolute_paths(load_config(DEFAULT_CONFIG, overrides))
    run_dir = storage.join(cfg.train.storage_path, cfg.train.name)

    def clusterings() -> list[str]:
        found = list(storage.listdir(cache)) if storage.exists(cache) else []
        for entry in storage.listdir(run_dir) if storage.exists(run_dir) else []:
            if entry.startswith("clustering-"):  # written once a round beside the checkpoints
                found.append(entry)
            if entry.startswith("checkpoint_") and storage.exists(storage.join(run_dir, entry, "clustering.pt")):
                found.append(storage.join(entry, "clustering.pt"))
        return found

    with pytest.raises(Exception, match=re.escape(victim)):
        launch(cfg)
    assert clusterings() == []

    storage.write_bytes(storage.join(copy, victim), kept)
    launch(cfg)
    assert clusterings() != []
