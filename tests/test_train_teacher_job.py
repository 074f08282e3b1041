"""jobs/train_teacher.py end to end with its storage on the session's loopback S3 bucket: stage A alone
on the session's Ray, the teacher written once to STORAGE/NAME-teacher/teacher.pt on the bucket, and registered
as brcd-teacher@candidate in a real sqlite MLflow store, the registered model being that file's teacher."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides

from brcd_dist import storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "solo"


@pytest.fixture(scope="module")
def teacher_job(local_ray, object_store, tiny_shards, tmp_path_factory):
    """(what the job printed, the bucket's storage path, the tracking URI)."""
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("job_train_teacher", REPO / "jobs" / "train_teacher.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    store = object_store.url("teacher_runs")
    uri = f"sqlite:///{tmp_path_factory.mktemp('teacher_job')}/mlflow.db"
    args = [o for o in tiny_overrides(tiny_shards, store, NAME) if not o.startswith("tracking.enabled=")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        job.main([*args, "tracking.enabled=true", f"tracking.uri={uri}"])
    return out.getvalue(), store, uri


def _kept(store: str) -> str:
    """The teacher kept on the bucket under its content key (teacher_reuse): the only one in this store."""
    (name,) = [n for n in storage.listdir(storage.join(store, "teachers")) if n.endswith(".pt")]
    return storage.join(store, "teachers", name)


def test_the_teacher_is_written_once_to_the_bucket(teacher_job):
    printed, store, _ = teacher_job
    teacher = _kept(store)
    assert f"teacher: {teacher}\n" in printed
    run_dir = storage.join(store, f"{NAME}-teacher")
    assert "teacher.pt" not in storage.listdir(run_dir)  # no second copy beside the checkpoints
    checkpoints = [n for n in storage.listdir(run_dir) if n.startswith("checkpoint_")]
    assert checkpoints and all("teacher.pt" not in storage.listdir(storage.join(run_dir, c)) for c in checkpoints)


def test_the_bucket_teacher_is_registered_as_brcd_teacher_candidate(teacher_job):
    from brcd_dist import tracking
    from brcd_dist.models import load_hash_model

    printed, store, uri = teacher_job
    assert "registered: models:/brcd-teacher@candidate (version 1)" in printed
    registered = tracking.load_model("models:/brcd-teacher@candidate", tracking_uri=uri)
    kept = load_hash_model(_kept(store))
    assert registered.arch == kept.arch == "resnet10t"
    a, b = registered.state_dict(), kept.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
