"""A trained teacher is kept by a content key and reused by the next run that would train the same one (issue 15):
same teacher config, code length, CIBHash τ, input geometry, training schedule, seed and data (the shard
manifest's digest) give the same key. `jobs/distill.py` looks the key up before launching, points
`teacher.uri` at the kept teacher when found (stage A then loads it instead of training), and keeps the teacher
of a run that trained one. `--retrain-teacher` skips the lookup.

Kept under `{train.storage_path}/teachers/KEY.pt` (a save_hash_model checkpoint) beside KEY.json (what the key was
made of). Files go through `_exists` / `_write_bytes`, plain local-path functions meant to be swapped for the
storage layer's URI functions; until then a remote storage_path (s3://...) turns reuse off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from brcd_dist import __version__
from brcd_dist.config import Config

TEACHERS_DIR = "teachers"
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
    "seed",
    "max_steps_per_epoch",
)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def teacher_inputs(cfg: Config, manifest_digest: str) -> dict:
    """What a trained teacher depends on, as plain values."""
    teacher = asdict(cfg.teacher)
    if teacher["weights_path"]:
        teacher["weights_path"] = _file_digest(teacher["weights_path"])  # the content, not where it lies
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
    """A run trains its teacher (no teacher.uri, at least one epoch) and keeps files where this module can."""
    return not cfg.teacher.uri and cfg.train.teacher_epochs > 0 and "://" not in cfg.train.storage_path


def teacher_path(cfg: Config, key: str) -> str:
    return os.path.join(cfg.train.storage_path, TEACHERS_DIR, f"{key}.pt")


# ----------------------------------------------------------------------------- storage (local paths for now)


def _exists(location: str) -> bool:
    return os.path.isfile(location)


def _write_bytes(location: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(location), exist_ok=True)
    tmp = f"{location}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, location)  # atomic: a concurrent reader sees the whole file or none


# ----------------------------------------------------------------------------- lookup and keeping


def find_teacher(cfg: Config, key: str) -> str | None:
    path = teacher_path(cfg, key)
    return path if _exists(path) else None


def with_teacher(cfg: Config, path: str) -> Config:
    """The config with stage A loading the teacher at `path` instead of training it."""
    return replace(cfg, teacher=replace(cfg.teacher, uri=path))


def keep_teacher(cfg: Config, key: str, teacher, manifest_digest: str) -> str:
    """Keep a trained teacher (a HashModel) under its key; returns where."""
    from brcd_dist.models import save_hash_model

    path = teacher_path(cfg, key)
    with tempfile.TemporaryDirectory() as tmp:
        save_hash_model(teacher, os.path.join(tmp, "teacher.pt"))
        _write_bytes(path, Path(tmp, "teacher.pt").read_bytes())
    _write_bytes(path[: -len(".pt")] + ".json", json.dumps(teacher_inputs(cfg, manifest_digest), indent=1).encode())
    return path
