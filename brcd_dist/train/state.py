"""What a checkpoint holds, so that a restarted run skips finished stages (teacher, clustering) and resumes the
student at the step it reached. One directory per checkpoint, merged by Ray Train from every rank:
  state.json        stage reached, epoch/step, metric history          (rank 0)
  teacher.pt        the finished teacher (save_hash_model format)      (rank 0)
  clustering.pt     centroids, bit masks, pseudo-labels by __key__     (rank 0; only a run without a run
                    directory: otherwise written once a round beside the checkpoints, clustering-rR.pt)
  best_student.pt   best student so far by validation mAP              (rank 0)
  student.pt        the final student (after stage D)                  (rank 0)
  pr_curves.json    precision-recall curves of the test queries       (rank 0)
  engine/           DeepSpeed checkpoint of the model being trained    (every rank)
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from brcd_dist import storage
from brcd_dist.clustering.pseudo_labels import PseudoLabels
from brcd_dist.models import HashModel, save_hash_model

STAGES = ("teacher", "clustering", "student", "done")
ENGINE_TAG = "state"  # DeepSpeed checkpoint tag (not "latest": DeepSpeed writes a file of that name)


@dataclass
class TrainState:
    stage: str = "teacher"  # the stage in progress (or "done")
    epoch: int = 0  # epoch in progress of the current stage
    step_in_epoch: int = 0  # batches of that epoch already trained
    global_step: int = 0
    cluster_round: int = 0
    best_metric: float = -1.0
    evals_without_improvement: int = 0
    teacher_uri: str = ""  # the run's finished teacher, written once beside its checkpoints (not into each)
    clustering_uri: str = ""  # the latest k-means round's Clustering, written once a round (not into each)
    history: dict = field(default_factory=lambda: {"train": [], "eval": [], "test": {}})
    config_digest: str = ""  # config.config_digest of the run that wrote it (a resume under another is refused)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def write_state(directory: Path, state: TrainState) -> None:
    (directory / "state.json").write_text(state.to_json())


def read_state(directory: Path) -> TrainState:
    return TrainState.from_json((directory / "state.json").read_text())


@dataclass
class Clustering:
    """Stage B's output (DESIGN §2): k-means over the teacher's codes of the training split."""

    centroids: torch.Tensor  # (K, L) float32
    masks: torch.Tensor  # (K, L) float32 in {0, 1}
    agreement: torch.Tensor  # (K, L) |mu_kb|
    counts: torch.Tensor  # (K,) members per cluster
    pseudo_labels: PseudoLabels  # __key__ -> cluster id (a dict given here is converted)
    inertia: list
    n_mask_fallback: int
    backend: str

    def __post_init__(self):
        self.pseudo_labels = PseudoLabels.of(self.pseudo_labels)

    def save(self, path: str | Path) -> None:
        """To a local path or s3:// / gs:// (atomically: storage.open_write)."""
        fields_ = {f.name: getattr(self, f.name) for f in fields(self)}
        with storage.open_write(str(path)) as f:
            torch.save({**fields_, "pseudo_labels": self.pseudo_labels.to_stored()}, f)

    @classmethod
    def load(cls, path: str | Path) -> "Clustering":
        """Tensors, dicts, lists and scalars only (weights_only): a crafted file in a shared store runs no code."""
        return cls(**torch.load(io.BytesIO(storage.read_bytes(str(path))), weights_only=True))


@dataclass
class CheckpointFiles:
    """The finished-stage files rank 0 writes into every checkpoint; a field left None writes no file."""

    teacher: Optional[HashModel] = None  # teacher.pt, once stage A is done
    clustering: Optional[Clustering] = None  # clustering.pt, the latest k-means round
    best_student: Optional[dict] = None  # best_student.pt: state_dict of the best student so far (model selection)
    student: Optional[HashModel] = None  # student.pt, the final student (stage D)
    curves: Optional[dict] = None  # pr_curves.json: {route: {"precision": [...], "recall": [...]}} (stage D)

    def write(self, directory: Path) -> list[str]:
        """Write the files that are set into `directory`; returns their names."""
        d, written = Path(directory), []
        if self.teacher is not None:
            save_hash_model(self.teacher, d / "teacher.pt")
            written.append("teacher.pt")
        if self.clustering is not None:
            self.clustering.save(d / "clustering.pt")
            written.append("clustering.pt")
        if self.best_student is not None:
            torch.save(self.best_student, d / "best_student.pt")
            written.append("best_student.pt")
        if self.student is not None:
            save_hash_model(self.student, d / "student.pt")
            written.append("student.pt")
        if self.curves is not None:
            (d / "pr_curves.json").write_text(
                json.dumps({k: {kk: [float(x) for x in vv] for kk, vv in v.items()} for k, v in self.curves.items()})
            )
            written.append("pr_curves.json")
        return written
