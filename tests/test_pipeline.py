"""The whole pipeline (DESIGN §1, stages A–D) under Ray Train's TorchTrainer with 2 DeepSpeed workers on CPU:
the tiny run of conftest.py, read back through the checkpoint it leaves.

Real Ray, real DeepSpeed over gloo, real FAISS k-means; tracking off (MLflow has its own tests)."""

import math

import pytest
import torch

from brcd_dist.data import load_manifest
from brcd_dist.driver import read_outputs, result_checkpoint_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAP_KEYS = ("test_query/sshp_map", "test_query/ashp_map", "test_query/teacher_map")


@pytest.fixture(scope="module")
def outputs(uninterrupted_run):
    return read_outputs(result_checkpoint_dir(uninterrupted_run.result))


def test_run_ends_without_error_and_reports_a_checkpoint(uninterrupted_run):
    result = uninterrupted_run.result
    assert result.error is None
    assert result.checkpoint is not None
    assert (result_checkpoint_dir(result) / "state.json").is_file()


def test_final_checkpoint_holds_the_student_and_the_run_dir_the_teacher_and_clustering_once(uninterrupted_run):
    names = {p.name for p in result_checkpoint_dir(uninterrupted_run.result).iterdir()}
    assert {"state.json", "student.pt", "pr_curves.json"} <= names
    # the frozen teacher and each round's clustering (every training key's pseudo-label) are written once beside
    # the checkpoints, not into each
    assert "teacher.pt" not in names and "clustering.pt" not in names
    assert (uninterrupted_run.storage / "teacher.pt").is_file()
    assert (uninterrupted_run.storage / "clustering-r0.pt").is_file()
    checkpoints = [p for p in uninterrupted_run.storage.iterdir() if p.name.startswith("checkpoint_")]
    assert checkpoints and not any((c / "clustering.pt").exists() for c in checkpoints)


def test_every_stage_ran_once_in_one_attempt(outputs):
    state = outputs.state
    assert state.stage == "done"
    assert state.history["attempts"] == [{"resumed_at": None, "ran": ["teacher", "clustering", "student", "test"]}]
    train_rows = state.history["train"]
    assert [r["teacher/epoch"] for r in train_rows if "teacher/epoch" in r] == [1]
    assert [r["student/epoch"] for r in train_rows if "student/epoch" in r] == [1, 2]
    assert [e["epoch"] for e in state.history["eval"]] == [1, 2]  # train.eval_every=1


def test_final_metrics_come_back_with_map_in_0_1(uninterrupted_run):
    metrics = uninterrupted_run.result.metrics
    assert metrics["stage"] == "done"
    for key in MAP_KEYS:
        value = metrics[key]
        assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)
    assert metrics["student_images_per_s"] > 0 and metrics["teacher_images_per_s"] > 0


def test_checkpoint_state_keeps_the_reported_test_metrics(uninterrupted_run, outputs):
    for key in MAP_KEYS:
        assert outputs.test[key] == uninterrupted_run.result.metrics[key]


def test_clustering_labels_every_training_image_with_one_of_k_clusters(outputs, tiny_shards):
    c = outputs.clustering
    train_keys = load_manifest(tiny_shards).splits["train"].keys
    assert sorted(c.pseudo_labels) == sorted(train_keys)
    assert set(c.pseudo_labels.values()) <= set(range(4))  # brcd.clusters=4
    assert c.centroids.shape == (4, 64) and c.masks.shape == (4, 64)
    assert int(c.counts.sum()) == len(train_keys)


def test_saved_models_are_the_configured_architectures_and_encode(outputs):
    assert outputs.teacher.arch == "resnet10t" and outputs.student.arch == "mobilenetv3_small_050"
    x = torch.zeros(2, 1, 32, 32)
    for model in (outputs.teacher, outputs.student):
        codes = model.eval().encode(x)
        assert codes.shape == (2, 64) and set(codes.unique().tolist()) <= {-1.0, 1.0}
