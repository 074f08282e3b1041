"""Reading IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

Format: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions, then each dimension as a big-endian
int32, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class IdxFormatError(ValueError):
    """A file that is not a uint8 IDX file; the message names the file."""


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes -> np.uint8 array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise IdxFormatError(f"{path}: IDX type 0x{dtype_code:02x} not supported (only 0x08 = uint8)")
    shape = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise IdxFormatError(f"{path}: {body.size} bytes of data for shape {shape} (truncated file?)")
    return body.reshape(shape)


def load_fashion_mnist(directory: str | Path) -> dict[str, np.ndarray]:
    """{'train_images' (60000,28,28), 'train_labels' (60000,), 'test_images', 'test_labels'} as uint8."""
    directory = Path(directory)
    out = {}
    for name, fname in FASHION_MNIST_FILES.items():
        path = directory / fname
        if not path.is_file() and (directory / fname[:-3]).is_file():
            path = directory / fname[:-3]  # un-gzipped copy
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory / fname}: Fashion-MNIST file not found (apt-get install dataset-fashion-mnist)"
            )
        out[name] = read_idx(path)
    for part in ("train", "test"):
        n_img, n_lab = len(out[f"{part}_images"]), len(out[f"{part}_labels"])
        if n_img != n_lab:
            raise IdxFormatError(f"{directory}: {n_img} {part} images but {n_lab} labels")
    return out
