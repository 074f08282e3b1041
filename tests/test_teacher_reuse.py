"""Teacher reuse (brcd_dist/teacher_reuse.py): which config changes make another teacher, and keeping/finding one."""

from __future__ import annotations

from pathlib import Path

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
        "train.teacher_split=database",
    ],
)
def test_teacher_side_settings_change_the_teacher_key(tmp_path, override):
    assert teacher_reuse.teacher_key(cfg(tmp_path, override), DIGEST) != teacher_reuse.teacher_key(
        cfg(tmp_path), DIGEST
    )


def test_other_data_changes_the_teacher_key(tmp_path):
    assert teacher_reuse.teacher_key(cfg(tmp_path), "b" * 64) != teacher_reuse.teacher_key(cfg(tmp_path), DIGEST)


def _teacher():
    from brcd_dist.models import HashModel

    torch.manual_seed(0)
    return HashModel("resnet10t", 64, in_chans=1, img_size=32)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_first_run_trains_its_teacher_and_keeps_it_under_its_key(tmp_path):
    c = cfg(tmp_path)
    plan = teacher_reuse.resolve(c, DIGEST)
    key = teacher_reuse.teacher_key(c, DIGEST)
    assert plan.trains and not plan.reused
    assert plan.keep == str(tmp_path / "teachers" / f"{key}.pt")
    assert plan.cache == str(tmp_path / "teachers" / "cache")


def test_a_kept_teacher_is_reused_by_a_later_run_unless_retrained(tmp_path):
    from brcd_dist.models import load_hash_model

    c = cfg(tmp_path)
    first = teacher_reuse.resolve(c, DIGEST)
    teacher_reuse.keep_teacher(first, _teacher())
    later = teacher_reuse.resolve(cfg(tmp_path, "brcd.alpha=0.5"), DIGEST)  # a student-side change: same key
    assert later.reused and later.load == later.keep == first.keep
    assert _same_weights(load_hash_model(later.load), _teacher())
    retrained = teacher_reuse.resolve(c, DIGEST, retrain=True)
    assert retrained.trains and retrained.keep == first.keep
    assert teacher_reuse.resolve(c, "b" * 64).trains  # other data: another key, nothing kept there


@pytest.mark.parametrize("override", ["teacher.uri=models:/brcd-teacher@champion", "train.teacher_epochs=0"])
def test_no_reuse_for_a_given_or_untrained_teacher(tmp_path, override):
    c = cfg(tmp_path, override)
    assert not teacher_reuse.reusable(c)
    plan = teacher_reuse.resolve(c, DIGEST)
    assert plan.load == c.teacher.uri and not plan.keep and not plan.reused
    assert plan.cache == str(tmp_path / "teachers" / "cache")  # codes and k-means of a given teacher are cached too


def test_a_named_cache_is_where_the_plan_keeps_codes_and_kmeans(tmp_path):
    assert teacher_reuse.resolve(cfg(tmp_path, "train.teacher_cache=/elsewhere"), DIGEST).cache == "/elsewhere"


def test_without_a_plan_a_run_neither_reuses_nor_caches(tmp_path):
    """driver.launch's default (tests, benches): teacher.uri or a trained teacher in the run's own teacher.pt."""
    plan = teacher_reuse.TeacherPlan.of_config(cfg(tmp_path))
    assert plan.trains and not plan.keep and not plan.cache


def _worker(tmp_path):
    from dataclasses import replace

    from brcd_dist.train.context import WorkerContext

    c = cfg(tmp_path, "teacher.name=resnet10t", "data.image_size=32")
    c.train = replace(c.train, teacher_epochs=0)  # stage A without an engine: the teacher keeps its initial weights
    return WorkerContext(cfg=c, manifest=None, rank=0, world_size=1, device=torch.device("cpu"), run_dir="")


def test_stage_a_writes_a_teacher_it_trains_to_its_key_and_a_later_run_loads_it_from_there(tmp_path):
    """Stage A (train/teacher_stage.py) in one process: the plan of a first run writes the trained teacher and
    what its key was made of; the next run's plan loads that file and writes nothing."""
    from brcd_dist.train.state import TrainState
    from brcd_dist.train.teacher_stage import teacher_stage

    c = cfg(tmp_path)
    plan = teacher_reuse.resolve(c, DIGEST)
    torch.manual_seed(0)
    trained, kept_at = teacher_stage(_worker(tmp_path), TrainState(), plan, None)
    assert kept_at == plan.keep
    json_file = plan.keep[: -len(".pt")] + ".json"
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir()) == [Path(json_file).name, Path(plan.keep).name]
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "teachers").iterdir()}

    later = teacher_reuse.resolve(c, DIGEST)
    torch.manual_seed(1)  # a trained teacher would differ: the loaded one must not
    loaded, kept_again = teacher_stage(_worker(tmp_path), TrainState(), later, None)
    assert later.reused and kept_again == plan.keep and _same_weights(loaded, trained)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "teachers").iterdir()} == written


def test_a_given_teacher_is_copied_once_into_the_run_and_a_restart_reads_that_copy(tmp_path):
    from brcd_dist.models import load_hash_model, save_hash_model
    from brcd_dist.train.state import TrainState
    from brcd_dist.train.teacher_stage import teacher_stage

    given = tmp_path / "given.pt"
    save_hash_model(_teacher(), given)
    ctx = _worker(tmp_path)
    ctx.run_dir = str(tmp_path / "run")
    plan = teacher_reuse.TeacherPlan(load=str(given))
    teacher, kept_at = teacher_stage(ctx, TrainState(), plan, None)
    assert kept_at == str(tmp_path / "run" / "teacher.pt") and _same_weights(load_hash_model(kept_at), teacher)
    given.unlink()  # a restart after stage A reads the run's copy, not the given file
    state = TrainState(stage="clustering", teacher_uri=kept_at)
    again, kept_again = teacher_stage(ctx, state, plan, None)
    assert kept_again == kept_at and _same_weights(again, teacher)


def test_a_teacher_kept_on_the_bucket_is_found_by_a_later_run_and_loads_with_its_weights(object_store):
    import uuid

    from brcd_dist import storage
    from brcd_dist.models import load_hash_model

    base = object_store.url("teacher_reuse", uuid.uuid4().hex[:8])
    c = load_config(DEFAULT_CONFIG, [f"train.storage_path={base}"])
    first = teacher_reuse.resolve(c, DIGEST)
    key = teacher_reuse.teacher_key(c, DIGEST)
    assert first.trains and first.keep == f"{base}/teachers/{key}.pt"
    teacher_reuse.keep_teacher(first, _teacher())
    assert storage.listdir(f"{base}/teachers") == [f"{key}.json", f"{key}.pt"]
    later = load_config(DEFAULT_CONFIG, [f"train.storage_path={base}", "brcd.alpha=0.5"])  # a student-side change
    plan = teacher_reuse.resolve(later, DIGEST)
    assert plan.reused and plan.load == first.keep and plan.cache == f"{base}/teachers/cache"
    assert _same_weights(load_hash_model(plan.load), _teacher())
