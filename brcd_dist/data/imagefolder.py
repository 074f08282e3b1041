"""ImageFolder-style sources: one sub-folder per class, with or without train/ and val/ above them."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # data.max_image_pixels: larger images are refused before they are decoded


class ImageRefused(ValueError):
    """An image that is not read: above the pixel cap, or not decodable; the message names it."""


def check_pixels(image: Image.Image, max_pixels: int, where: str) -> None:
    """Refuse an opened (not yet decoded: only its header was read) image above `max_pixels`."""
    w, h = image.size
    if max_pixels and w * h > max_pixels:
        raise ImageRefused(f"{where}: {w}x{h} = {w * h} pixels, above data.max_image_pixels={max_pixels}")


def _inside(path: Path, root: Path) -> bool:
    """True when path, symlinks resolved, stays under root (a link that leaves the root is not followed)."""
    return path.resolve().is_relative_to(root.resolve())


@dataclass
class ImageList:
    root: Path
    files: list[str]  # relative to root, sorted (class folder, then name): the index is the key's number
    labels: np.ndarray  # int64, index into the class names


def scan_class_folders(root: str | Path, classes: list[str] | None = None) -> tuple[list[str], ImageList]:
    """Class names (sorted sub-folder names, or the given ones) and the images under them."""
    root = Path(root)
    if classes is None:
        classes = sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and _inside(p, root))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE or ROOT/train/CLASS/IMAGE)")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir() or not _inside(folder, root):
            continue  # a class absent from val/ is allowed; one linked from outside the root is not read
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _inside(p, root):
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


def encode_png(path: str | Path, in_chans: int, shorter_side: int,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """Image file -> PNG bytes, L or RGB, shorter side reduced to `shorter_side` (never enlarged). An image above
    `max_pixels` is refused (ImageRefused) from its header, before any pixel is decoded."""
    with Image.open(path) as im:
        check_pixels(im, max_pixels, str(path))
        im = im.convert("L" if in_chans == 1 else "RGB")
        w, h = im.size
        scale = shorter_side / min(w, h)
        if scale < 1:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def encode_png_or_reason(path: str | Path, in_chans: int, shorter_side: int,
                         max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> bytes | str:
    """encode_png, or a one-line reason for an image that cannot be used (corrupt, empty, above the pixel cap):
    such an image is skipped, counted and named, never the end of a shard run."""
    try:
        return encode_png(path, in_chans, shorter_side, max_pixels)
    except ImageRefused as err:
        return str(err)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{path}: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
