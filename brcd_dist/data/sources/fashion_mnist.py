"""Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist): 60,000 training and 10,000 test images of
10 classes, 28x28 gray, stored as PNG (the arrays have no encoding of their own)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

from brcd_dist.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from brcd_dist.data.sources import ImageSet, Source, TooFewPerClass, limit, stable_keys

SIZE = 28
PER_CLASS = 6000  # training images of each of its 10 classes
FIXED = {"in_chans": 1, "image_size": SIZE, "holdout_fraction": 0.0}  # stored as is; readers convert
RAY_TASKS = False  # small: one process writes it
MISSING_HINT = " (apt-get install dataset-fashion-mnist)"


def train_split_size(data) -> tuple[int, str]:
    if data.train_per_class > PER_CLASS:
        raise TooFewPerClass(f"must be <= {PER_CLASS} (the images of each Fashion-MNIST class)")
    return len(FASHION_MNIST_CLASSES) * data.train_per_class, "Fashion-MNIST"


def _png_gray(image: np.ndarray) -> tuple[str, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return "png", buf.getvalue()


def open(spec, num_procs: int = 1) -> Source:  # noqa: A001 - the source interface's name
    arrays = load_fashion_mnist(spec.source_path)

    def side(part: str) -> ImageSet:
        n = limit(len(arrays[f"{part}_images"]), spec.max_images)
        images, labels = arrays[f"{part}_images"][:n], arrays[f"{part}_labels"][:n].astype(np.int64)
        cache: dict[int, tuple[str, bytes]] = {}  # the train subset re-uses the database's encodings

        def encode_many(indices: np.ndarray) -> Iterator[tuple[str, bytes]]:
            for i in indices:
                i = int(i)
                if i not in cache:
                    cache[i] = _png_gray(images[i])
                yield cache[i]

        return ImageSet(stable_keys(part, range(n), len(arrays[f"{part}_images"])), labels, encode_many)

    return Source(list(FASHION_MNIST_CLASSES), SIZE, 1, side("train"), side("test"))
