"""An ImageFolder in an object store: `data.source_path=s3://BUCKET/PREFIX` (or gs://) holding CLASS/IMAGE, or
train/ and val/ above the classes, listed and read through the storage layer (credentials from the standard
chain). The same keys, split and bytes as the `imagefolder` source gives for a local copy of the folder, so the
shards are identical; with make_shards --ray each task reads its shard's images from the store, on any node."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from brcd_dist import storage
from brcd_dist.data import imagefolder, splits
from brcd_dist.data.sources import ImageSet, Source, limit, stable_keys

FIXED: dict = {}
RAY_TASKS = True
MISSING_HINT = " (an s3:// or gs:// prefix holding CLASS/IMAGE)"


def train_split_size(data) -> None:
    """Not known before listing the store, which config validation does not do (the writer checks the classes)."""
    return None


def _scan(root: str, files: list[str], classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, image files relative to `root` by class then name, labels) from the store's file list under root."""
    images = [f for f in files if "/" in f and "." + f.rsplit(".", 1)[-1].lower() in imagefolder.IMAGE_SUFFIXES]
    if classes is None:
        classes = sorted({f.split("/", 1)[0] for f in images if not f.startswith(".")})
    if not classes:
        raise ValueError(f"{root}: no class folders (expected ROOT/CLASS/IMAGE or ROOT/train/CLASS/IMAGE)")
    label_of = {c: i for i, c in enumerate(classes)}
    kept = sorted((label_of[f.split("/", 1)[0]], f) for f in images if f.split("/", 1)[0] in label_of)
    if not kept:
        raise ValueError(f"{root}: no images (suffixes {', '.join(sorted(imagefolder.IMAGE_SUFFIXES))})")
    return classes, [f for _, f in kept], np.asarray([y for y, _ in kept], dtype=np.int64)


def _side(root: str, files: list[str], labels: np.ndarray, keys: list[str], positions, spec) -> ImageSet:
    paths = [storage.join(root, files[p]) for p in positions]

    def encode_many(indices: np.ndarray) -> Iterator[tuple[str, bytes] | str]:
        for i in indices:
            yield imagefolder.encode_for_shard_or_reason(
                paths[int(i)], spec.in_chans, spec.shorter_side, spec.max_image_pixels
            )

    return ImageSet([keys[p] for p in positions], labels[positions], encode_many, paths)


def open(spec, num_procs: int = 1) -> Source:  # noqa: A001 - the source interface's name
    root = spec.source_path.rstrip("/")
    if storage.scheme(root) not in storage.OBJECT_SCHEMES:
        raise ValueError(f"data.source_path={spec.source_path!r}: expected s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    listed = storage.list_files(root)
    if not listed:
        raise FileNotFoundError(f"data.source_path={spec.source_path!r}: nothing there")
    tops = {f.split("/", 1)[0] for f in listed if "/" in f}
    n_max = spec.max_images
    if {"train", "val"} <= tops:
        sub = {p: [f.split("/", 1)[1] for f in listed if f.startswith(p + "/")] for p in ("train", "val")}
        classes, tr_files, tr_labels = _scan(f"{root}/train", sub["train"])
        _, va_files, va_labels = _scan(f"{root}/val", sub["val"], classes)
        tr_keys = stable_keys("train", range(len(tr_files)), len(tr_files))
        va_keys = stable_keys("val", range(len(va_files)), len(va_files))
        train = _side(f"{root}/train", tr_files, tr_labels, tr_keys, np.arange(limit(len(tr_files), n_max)), spec)
        test = _side(f"{root}/val", va_files, va_labels, va_keys, np.arange(limit(len(va_files), n_max)), spec)
        return Source(classes, spec.shorter_side, spec.in_chans, train, test)
    classes, files, labels = _scan(root, listed)
    keys = stable_keys("img", range(len(files)), len(files))
    kept, held = splits.holdout_split(labels, spec.holdout_fraction, spec.seed)
    kept, held = kept[: limit(len(kept), n_max)], held[: limit(len(held), n_max)]
    train, test = _side(root, files, labels, keys, kept, spec), _side(root, files, labels, keys, held, spec)
    return Source(classes, spec.shorter_side, spec.in_chans, train, test)
