"""ImageFolder-style sources: one sub-folder per class, with or without train/ and val/ above them."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageList:
    root: Path
    files: list[str]  # relative to root, sorted (class folder, then name): the index is the key's number
    labels: np.ndarray  # int64, index into the class names


def scan_class_folders(root: str | Path, classes: list[str] | None = None) -> tuple[list[str], ImageList]:
    """Class names (sorted sub-folder names, or the given ones) and the images under them."""
    root = Path(root)
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE or ROOT/train/CLASS/IMAGE)")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a class absent from val/ is allowed
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(str(p.relative_to(root)))
                labels.append(label)
    if not files:
        raise ValueError(f"{root}: no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, ImageList(root, files, np.asarray(labels, dtype=np.int64))


def has_train_val(root: str | Path) -> bool:
    root = Path(root)
    return (root / "train").is_dir() and (root / "val").is_dir()


def stored_size(image_size: int) -> int:
    """Shorter side kept in the shards: 256 for 224 (the eval/crop convention), room for random crops."""
    return int(round(image_size * 8 / 7))


def encode_png(path: str | Path, in_chans: int, shorter_side: int) -> bytes:
    """Image file -> PNG bytes, L or RGB, shorter side reduced to `shorter_side` (never enlarged)."""
    with Image.open(path) as im:
        im = im.convert("L" if in_chans == 1 else "RGB")
        w, h = im.size
        scale = shorter_side / min(w, h)
        if scale < 1:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()
