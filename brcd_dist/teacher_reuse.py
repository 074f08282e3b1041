"""A trained teacher is kept by a content key and reused by the next run that would train the same one:
same teacher config, code length, CIBHash τ, input geometry, training schedule, seed and data (the shard
manifest's digest) give the same key. `jobs/distill.py` looks the key up before launching, points
`train.kept_teacher` at the kept teacher when found (stage A then loads it instead of training), and keeps the
teacher of a run that trained one. `train.kept_teacher` is not part of the run's config digest: loading the kept
teacher and training it are the same run, so a run name resumes either way. `--retrain-teacher` skips the lookup.

Kept under `{train.storage_path}/teachers/KEY.pt` (a save_hash_model checkpoint) beside KEY.json (what the key was
made of), through the storage layer (brcd_dist/storage.py): a local path or s3:// / gs://, written atomically.
What depends only on the teacher and the data (its codes of each split, the k-means result) is kept under
`{train.storage_path}/teachers/cache/` when `brcd.clustering_cache` is unset (`with_cache`): those files are named
by the teacher's weights and the shards' digest (train/teacher_cache.py), so a run that reuses the teacher also
skips its encoding and the clustering.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

from brcd_dist import __version__, storage
from brcd_dist.config import Config

TEACHERS_DIR = "teachers"
CACHE_DIR = "cache"  # under TEACHERS_DIR: the default brcd.clustering_cache of a run that keeps its teacher
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


def with_cache(cfg: Config) -> Config:
    """A run whose teacher is kept also keeps its teacher's codes and k-means result (under teachers/cache/) unless
    brcd.clustering_cache names another place; other configs are returned as they are."""
    if not reusable(cfg) or cfg.brcd.clustering_cache:
        return cfg
    cache = storage.join(cfg.train.storage_path, TEACHERS_DIR, CACHE_DIR)
    return replace(cfg, brcd=replace(cfg.brcd, clustering_cache=cache))


# ----------------------------------------------------------------------------- lookup and keeping


def find_teacher(cfg: Config, key: str) -> str | None:
    path = teacher_path(cfg, key)
    return path if storage.is_file(path) else None


def with_teacher(cfg: Config, path: str) -> Config:
    """The config with stage A loading the teacher at `path` instead of training it."""
    return replace(cfg, train=replace(cfg.train, kept_teacher=path))


def keep_teacher(cfg: Config, key: str, teacher, manifest_digest: str) -> str:
    """Keep a trained teacher (a HashModel) under its key; returns where."""
    from brcd_dist.models import save_hash_model

    path = teacher_path(cfg, key)
    save_hash_model(teacher, path)  # atomic (storage.open_write): a concurrent lookup sees the whole file or none
    inputs = json.dumps(teacher_inputs(cfg, manifest_digest), indent=1).encode()
    storage.write_bytes(path[: -len(".pt")] + ".json", inputs)
    return path
