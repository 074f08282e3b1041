"""A second jobs/distill.py with the same teacher config, data and seed reuses the first run's teacher:
two tiny runs (conftest's) on the session's Ray, in one storage path, the second differing in a student-side
setting only; then a third with --retrain-teacher trains again."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def distill(argv):
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("job_distill", REPO / "jobs" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def trained_teacher(storage, name) -> bool:
    """Whether the run's final checkpoint shows teacher epochs."""
    from test_distill_tracking import final_checkpoint

    from brcd_dist.driver import read_outputs

    state = read_outputs(final_checkpoint(storage / name)).state
    return any("teacher/epoch_loss" in row for row in state.history["train"])


def test_second_run_reuses_the_teacher_and_retrain_teacher_trains_it(local_ray, tiny_shards, tmp_path, capsys):
    from test_distill_tracking import final_checkpoint

    from brcd_dist.driver import read_outputs
    from brcd_dist.models import load_hash_model

    storage = tmp_path / "runs"

    def run(name, *extra):
        args = [o for o in tiny_overrides(tiny_shards, storage, name) if not o.startswith("train.epochs=")]
        distill([*args, "train.epochs=1", *extra])
        return capsys.readouterr().out

    first = run("first")
    assert "teacher: kept as" in first and trained_teacher(storage, "first")
    (kept,) = (storage / "teachers").glob("*.pt")
    cached = {p.name: p.stat().st_mtime_ns for p in (storage / "teachers" / "cache").iterdir()}
    assert any(n.startswith("k4-") for n in cached) and any(n.startswith("codes-database-") for n in cached)
    second = run("second", "brcd.alpha=0.5")
    assert f"teacher: reusing {kept}" in second and not trained_teacher(storage, "second")
    # the teacher's codes and k-means were read back, not made and written again
    assert {p.name: p.stat().st_mtime_ns for p in (storage / "teachers" / "cache").iterdir()} == cached
    reused = read_outputs(final_checkpoint(storage / "second")).teacher
    assert all(
        torch.equal(a, b) for a, b in zip(reused.state_dict().values(), load_hash_model(kept).state_dict().values())
    )
    third = run("third", "--retrain-teacher")
    assert "reusing" not in third and trained_teacher(storage, "third")
