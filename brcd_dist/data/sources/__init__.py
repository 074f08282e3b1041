"""The sources that shards are made from, one module each in this package, found by name (as the KD losses are):
adding a source is adding a file. `data.source` takes a module's name (or "shards": shards already made).

A source module provides:
    FIXED: dict                                  manifest parameters the source fixes (e.g. a stored size)
    RAY_TASKS: bool                              its images can be read by path in Ray tasks (make_shards --ray)
    MISSING_HINT: str                            said after "data.source_path=...: not found"
    train_split_size(data) -> (n, where) | None  the train split's size before any shard is written (config
                                                 validation: raises TooFewPerClass for data.train_per_class above
                                                 what a class holds, ValueError for a source it cannot use)
    open(spec, num_procs) -> Source              the training and test images (shards.ShardSpec)

Importing this package and listing the names imports no source module (config validation stays light).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType

import numpy as np


def names() -> tuple[str, ...]:
    """The source names: this package's modules."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get(name: str) -> ModuleType:
    if name not in names():
        raise ValueError(f"data.source={name!r}: shards can be made from {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")


class TooFewPerClass(ValueError):
    """data.train_per_class asks more images of a class than it holds (config validation names that key)."""


@dataclass
class ImageSet:
    """One side of a source (training or test images): keys, labels, and how to get image i's stored bytes."""

    keys: list[str]
    labels: np.ndarray
    # indices -> (extension, bytes), or the reason (str) an image is skipped (corrupt, empty, above the pixel cap)
    encode_many: Callable[[np.ndarray], Iterable[tuple[str, bytes] | str]]
    paths: list[str] | None = None  # image i's file, for sources with RAY_TASKS


@dataclass
class Source:
    classes: list[str]
    image_size: int  # the stored shorter side (0: as the source's files are)
    in_chans: int
    train: ImageSet
    test: ImageSet


def stable_keys(prefix: str, indices: Iterable[int], n: int) -> list[str]:
    """`prefix-00042`: zero-padded to n's width (at least 5), so that keys sort as their indices do."""
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{prefix}-{i:0{width}d}" for i in indices]


def limit(n: int, max_images: int) -> int:
    return min(n, max_images) if max_images > 0 else n
