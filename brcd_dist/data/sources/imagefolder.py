"""An ImageFolder (CLASS/IMAGE, or train/ and val/ above them) on a local or shared disk. Its encoded bytes are
kept (a JPEG stays JPEG) unless a shorter side is asked (`data.shard_shorter_side`, then re-encoded as JPEG)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from brcd_dist.data import imagefolder, splits
from brcd_dist.data.sources import ImageSet, Source, TooFewPerClass, limit, stable_keys

FIXED: dict = {}
RAY_TASKS = True  # each shard's images read by path: the folder must be at the same path on every node
MISSING_HINT = ""
POOL_MIN_IMAGES = 1000  # fewer images: encoding in this process beats starting a pool


def train_split_size(data) -> tuple[int, str] | None:
    """len(classes) x train_per_class, refused when a class holds fewer training images or there is one class."""
    root = Path(data.source_path)
    if not root.is_dir():
        return None
    if imagefolder.has_train_val(root):
        classes, images = imagefolder.scan_class_folders(root / "train")
        labels = images.labels
    else:
        classes, images = imagefolder.scan_class_folders(root)
        kept, _ = splits.holdout_split(images.labels, splits.DEFAULT_HOLDOUT, data.split_seed)
        labels = images.labels[kept]
    if len(classes) < 2:
        raise ValueError(f"holds {len(classes)} class folder(s); retrieval needs >= 2 classes")
    counts = np.bincount(labels, minlength=len(classes))
    smallest = int(counts.argmin())
    if data.train_per_class > counts[smallest]:
        raise TooFewPerClass(
            f"must be <= {int(counts[smallest])}, the training images of class {classes[smallest]!r}",
        )
    return len(classes) * data.train_per_class, f"{len(classes)} classes x data.train_per_class"


def _side(images: imagefolder.ImageList, keys: list[str], positions: np.ndarray, spec, num_procs: int) -> ImageSet:
    paths = [str(images.root / images.files[p]) for p in positions]
    encode = partial(
        imagefolder.encode_for_shard_or_reason,
        in_chans=spec.in_chans,
        shorter_side=spec.shorter_side,
        max_pixels=spec.max_image_pixels,
    )

    def encode_many(indices: np.ndarray) -> Iterator[tuple[str, bytes] | str]:
        todo = [paths[int(i)] for i in indices]
        if num_procs <= 1 or len(todo) < POOL_MIN_IMAGES:
            yield from map(encode, todo)
            return
        # fork, as DataLoader does: spawn would re-import the caller's main module in every child, and a script
        # without a __main__ guard would then re-enter write_shards and wait on the directory lock forever
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(num_procs) as pool:
            yield from pool.imap(encode, todo, chunksize=16)

    return ImageSet([keys[p] for p in positions], images.labels[positions], encode_many, paths)


def open(spec, num_procs: int = 1) -> Source:  # noqa: A001 - the source interface's name
    """train/ + val/ when both exist (keys 'train-N', 'val-N'); else one folder, split by the seed ('img-N')."""
    root, size, n_max = Path(spec.source_path), spec.shorter_side, spec.max_images
    if imagefolder.has_train_val(root):
        classes, train = imagefolder.scan_class_folders(root / "train")
        _, val = imagefolder.scan_class_folders(root / "val", classes)
        tr_keys = stable_keys("train", range(len(train.files)), len(train.files))
        te_keys = stable_keys("val", range(len(val.files)), len(val.files))
        return Source(
            classes,
            size,
            spec.in_chans,
            _side(train, tr_keys, np.arange(limit(len(train.files), n_max)), spec, num_procs),
            _side(val, te_keys, np.arange(limit(len(val.files), n_max)), spec, num_procs),
        )
    classes, every = imagefolder.scan_class_folders(root)
    keys = stable_keys("img", range(len(every.files)), len(every.files))
    kept, held = splits.holdout_split(every.labels, spec.holdout_fraction, spec.seed)
    kept, held = kept[: limit(len(kept), n_max)], held[: limit(len(held), n_max)]
    return Source(
        classes,
        size,
        spec.in_chans,
        _side(every, keys, kept, spec, num_procs),
        _side(every, keys, held, spec, num_procs),
    )
