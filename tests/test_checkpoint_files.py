"""train/state.CheckpointFiles: the record of what rank 0 writes into a checkpoint, read back by the driver."""

from __future__ import annotations

import json

import torch

from brcd_dist.driver import read_outputs
from brcd_dist.models import HashModel
from brcd_dist.train.state import CheckpointFiles, Clustering, TrainState, write_state


def small_model(seed: int) -> HashModel:
    torch.manual_seed(seed)
    return HashModel("resnet10t", bits=16, in_chans=1, img_size=32).eval()


def small_clustering() -> Clustering:
    return Clustering(
        centroids=torch.eye(2, 16),
        masks=torch.ones(2, 16),
        agreement=torch.ones(2, 16),
        counts=torch.tensor([3, 1]),
        pseudo_labels={"a": 0, "b": 1},
        inertia=[2.0, 1.0],
        n_mask_fallback=0,
        backend="torch",
    )


def test_an_empty_record_writes_no_file(tmp_path):
    assert CheckpointFiles().write(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_each_field_writes_its_own_file(tmp_path):
    files = CheckpointFiles(
        teacher=small_model(0),
        clustering=small_clustering(),
        best_student={"w": torch.ones(2)},
        student=small_model(1),
        curves={"sshp": {"precision": [1.0], "recall": [0.5]}},
    )
    assert (
        sorted(files.write(tmp_path))
        == sorted(p.name for p in tmp_path.iterdir())
        == ["best_student.pt", "clustering.pt", "pr_curves.json", "student.pt", "teacher.pt"]
    )


def test_the_driver_reads_back_what_the_record_wrote(tmp_path):
    teacher, student, clustering = small_model(0), small_model(1), small_clustering()
    curves = {"sshp": {"precision": [1.0, 0.5], "recall": [0.25, 1.0]}}
    write_state(tmp_path, TrainState(stage="done", global_step=7))
    CheckpointFiles(teacher=teacher, clustering=clustering, student=student, curves=curves).write(tmp_path)
    out = read_outputs(tmp_path)
    assert out.state.stage == "done" and out.state.global_step == 7
    for got, want in ((out.teacher, teacher), (out.student, student)):
        for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert out.clustering.pseudo_labels == clustering.pseudo_labels
    torch.testing.assert_close(out.clustering.centroids, clustering.centroids)
    assert out.curves == json.loads(json.dumps(curves))


def test_best_student_is_the_state_dict_as_given(tmp_path):
    weights = {"w": torch.arange(4.0)}
    CheckpointFiles(best_student=weights).write(tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "best_student.pt", weights_only=True)["w"], weights["w"])
