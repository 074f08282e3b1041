"""Where a run's teacher comes from and where it is kept, decided once on the driver (`resolve`) for every job
(distill, tune, train_teacher) and handed to stage A in the workers' `train_loop_config`, never in the config.

A trained teacher is kept by a content key and reused by the next run that would train the same one: same
teacher config, code length, CIBHash τ, input geometry, training schedule, seed and data (the shard manifest's
digest) give the same key. Stage A writes a teacher it trains straight to `{train.storage_path}/teachers/KEY.pt`
(a save_hash_model checkpoint, beside KEY.json: what the key was made of), through the storage layer (a local path
or s3:// / gs://, written atomically); the next run with that key loads it instead of training. Loading the kept
teacher and training it are the same run, so a run name resumes either way. `--retrain-teacher` skips the lookup.

What depends only on the teacher and the data (its codes of each split, the k-means results) is kept under
`train.teacher_cache`, by default `{train.storage_path}/teachers/cache/`: those files are named by the teacher's
weights and the shards' digest (train/teacher_cache.py), so a run that reuses a teacher, and every trial of a
sweep, also skips its encoding and the clustering.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from brcd_dist import __version__, storage
from brcd_dist.config import Config

TEACHERS_DIR = "teachers"
CACHE_DIR = "cache"  # under TEACHERS_DIR: the default train.teacher_cache
# Every TrainConfig field that changes what stage A computes (not the student's schedule, checkpoints or failures).
TRAIN_FIELDS = (
    "workers",
    "use_gpu",
    "teacher_epochs",
    "teacher_split",
    "teacher_lr",
    "batch_size",
    "grad_accum",
    "weight_decay",
    "zero_stage",
    "precision",
    "seed",
    "max_steps_per_epoch",
)


@dataclass(frozen=True)
class TeacherPlan:
    """What stage A does with the teacher. Stage A loads `load` when set (a kept teacher, or teacher.uri: a
    checkpoint file or an MLflow URI) and trains otherwise; the teacher then lives at `keep` (written there unless
    it was loaded from there; "" = the run's own `teacher.pt` beside its checkpoints), once per run."""

    load: str = ""
    keep: str = ""
    inputs: str = ""  # KEY.json's text, written beside a kept teacher that stage A trains
    cache: str = ""  # train.teacher_cache: the teacher's codes and k-means results ("" = not kept)

    @property
    def reused(self) -> bool:
        """Stage A loads a teacher kept by an earlier run under the same key."""
        return bool(self.load) and self.load == self.keep

    @property
    def trains(self) -> bool:
        return not self.load

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_config(cls, cfg: Config) -> "TeacherPlan":
        """No reuse: teacher.uri if given, else trained into the run's own teacher.pt; the cache as configured."""
        return cls(load=cfg.teacher.uri, cache=cfg.train.teacher_cache)


def teacher_inputs(cfg: Config, manifest_digest: str) -> dict:
    """What a trained teacher depends on, as plain values."""
    teacher = asdict(cfg.teacher)
    if teacher["weights_path"]:
        teacher["weights_path"] = storage.file_sha256(teacher["weights_path"])  # the content, not where it lies
    return {
        "teacher": teacher,
        "bits": cfg.brcd.bits,
        "tau": cfg.brcd.tau,
        "image_size": cfg.data.image_size,
        "in_chans": cfg.data.in_chans,
        "train": {k: getattr(cfg.train, k) for k in TRAIN_FIELDS},
        "data": manifest_digest,
        "brcd_dist": __version__,
    }


def teacher_key(cfg: Config, manifest_digest: str) -> str:
    text = json.dumps(teacher_inputs(cfg, manifest_digest), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def reusable(cfg: Config) -> bool:
    """A run trains its teacher (no teacher.uri, at least one epoch): its teacher can be kept and looked up."""
    return not cfg.teacher.uri and cfg.train.teacher_epochs > 0


def teacher_path(cfg: Config, key: str) -> str:
    return storage.join(cfg.train.storage_path, TEACHERS_DIR, f"{key}.pt")


def default_cache(cfg: Config) -> str:
    return cfg.train.teacher_cache or storage.join(cfg.train.storage_path, TEACHERS_DIR, CACHE_DIR)


def resolve(cfg: Config, manifest_digest: str, retrain: bool = False) -> TeacherPlan:
    """The one reuse rule: teacher.uri is loaded; a teacher that would be trained is loaded from its key's file
    when an earlier run kept one there (unless `retrain`), else trained and kept there. The teacher's codes and
    k-means results are cached under train.teacher_cache or its default."""
    cache = default_cache(cfg)
    if not reusable(cfg):
        return TeacherPlan(load=cfg.teacher.uri, cache=cache)
    path = teacher_path(cfg, teacher_key(cfg, manifest_digest))
    if not retrain and storage.is_file(path):
        return TeacherPlan(load=path, keep=path, cache=cache)
    return TeacherPlan(keep=path, inputs=json.dumps(teacher_inputs(cfg, manifest_digest), indent=1), cache=cache)


def keep_teacher(plan: TeacherPlan, teacher) -> None:
    """Write the teacher where the plan keeps it (atomic, storage.open_write: a concurrent lookup sees the whole
    file or none), with what its key was made of beside it."""
    from brcd_dist.models import save_hash_model

    save_hash_model(teacher, plan.keep)
    if plan.inputs:
        storage.write_bytes(plan.keep[: -len(".pt")] + ".json", plan.inputs.encode())
