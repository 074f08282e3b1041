"""Teacher reuse (brcd_dist/teacher_reuse.py): which config changes make another teacher, and keeping/finding one."""

from __future__ import annotations

import pytest
import torch
from conftest import DEFAULT_CONFIG

from brcd_dist import teacher_reuse
from brcd_dist.config import load_config

DIGEST = "a" * 64


def cfg(tmp_path, *overrides):
    return load_config(DEFAULT_CONFIG, [f"train.storage_path={tmp_path}", *overrides])


@pytest.mark.parametrize(
    "override",
    [
        "brcd.alpha=0.5",
        "brcd.delta=0.3",
        "brcd.clusters=20",
        "student.name=resnet18",
        "train.epochs=3",
        "train.lr=0.01",
        "train.checkpoint_every=7",
        "eval.topk=10",
        "train.name=other",
        "tracking.enabled=false",
    ],
)
def test_student_side_settings_keep_the_teacher_key(tmp_path, override):
    assert teacher_reuse.teacher_key(cfg(tmp_path, override), DIGEST) == teacher_reuse.teacher_key(
        cfg(tmp_path), DIGEST
    )


@pytest.mark.parametrize(
    "override",
    [
        "teacher.name=resnet10t",
        "teacher.head=mlp",
        "brcd.bits=32",
        "brcd.tau=0.5",
        "train.teacher_epochs=5",
        "train.teacher_lr=0.01",
        "train.seed=1",
        "train.batch_size=32",
        "train.workers=1",
        "train.teacher_split=train",
    ],
)
def test_teacher_side_settings_change_the_teacher_key(tmp_path, override):
    assert teacher_reuse.teacher_key(cfg(tmp_path, override), DIGEST) != teacher_reuse.teacher_key(
        cfg(tmp_path), DIGEST
    )


def test_other_data_changes_the_teacher_key(tmp_path):
    assert teacher_reuse.teacher_key(cfg(tmp_path), "b" * 64) != teacher_reuse.teacher_key(cfg(tmp_path), DIGEST)


def test_a_kept_teacher_is_found_by_its_key_and_loads_with_its_weights(tmp_path):
    from brcd_dist.models import HashModel, load_hash_model

    c = cfg(tmp_path)
    key = teacher_reuse.teacher_key(c, DIGEST)
    assert teacher_reuse.find_teacher(c, key) is None
    torch.manual_seed(0)
    teacher = HashModel("resnet10t", 64, in_chans=1, img_size=32)
    path = teacher_reuse.keep_teacher(c, key, teacher, DIGEST)
    assert teacher_reuse.find_teacher(c, key) == path
    loaded = load_hash_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    assert teacher_reuse.with_teacher(c, path).train.kept_teacher == path


def test_loading_the_kept_teacher_resumes_the_run_that_would_train_it(tmp_path):
    """A run name started with a kept teacher resumes when the teacher is trained again, and the other way round:
    both are the same run (the key pins the teacher), so the run guard sees one config."""
    from brcd_dist.config import config_digest

    c = cfg(tmp_path)
    assert config_digest(teacher_reuse.with_teacher(c, str(tmp_path / "teachers" / "k.pt"))) == config_digest(c)


@pytest.mark.parametrize("override", ["teacher.uri=models:/brcd-teacher@champion", "train.teacher_epochs=0"])
def test_no_reuse_for_a_given_or_untrained_teacher(tmp_path, override):
    assert not teacher_reuse.reusable(load_config(DEFAULT_CONFIG, [f"train.storage_path={tmp_path}", override]))


def test_a_run_that_keeps_its_teacher_keeps_its_codes_and_kmeans_beside_it(tmp_path):
    c = teacher_reuse.with_cache(cfg(tmp_path))
    assert c.brcd.clustering_cache == str(tmp_path / "teachers" / "cache")


@pytest.mark.parametrize("override", ["brcd.clustering_cache=/elsewhere", "teacher.uri=models:/brcd-teacher@champion"])
def test_a_named_cache_or_a_given_teacher_keeps_its_cache_setting(tmp_path, override):
    c = cfg(tmp_path, override)
    assert teacher_reuse.with_cache(c).brcd.clustering_cache == c.brcd.clustering_cache


def test_a_teacher_kept_on_the_bucket_is_found_by_a_later_run_and_loads_with_its_weights(object_store):
    import uuid

    from brcd_dist import storage
    from brcd_dist.models import HashModel, load_hash_model

    base = object_store.url("teacher_reuse", uuid.uuid4().hex[:8])
    c = load_config(DEFAULT_CONFIG, [f"train.storage_path={base}"])
    assert teacher_reuse.reusable(c)
    key = teacher_reuse.teacher_key(c, DIGEST)
    assert teacher_reuse.find_teacher(c, key) is None
    torch.manual_seed(0)
    teacher = HashModel("resnet10t", 64, in_chans=1, img_size=32)
    path = teacher_reuse.keep_teacher(c, key, teacher, DIGEST)
    assert path == f"{base}/teachers/{key}.pt" and storage.listdir(f"{base}/teachers") == [f"{key}.json", f"{key}.pt"]
    later = load_config(DEFAULT_CONFIG, [f"train.storage_path={base}", "brcd.alpha=0.5"])  # a student-side change
    assert teacher_reuse.find_teacher(later, teacher_reuse.teacher_key(later, DIGEST)) == path
    loaded = load_hash_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    assert teacher_reuse.with_cache(later).brcd.clustering_cache == f"{base}/teachers/cache"
