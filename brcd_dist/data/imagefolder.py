"""ImageFolder-style sources: one sub-folder per class, with or without train/ and val/ above them."""

from __future__ import annotations

import io
import os
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


def _image_files(folder: Path, root: Path) -> list[str]:
    """Image files under folder, relative to root, in Path order (a key's number): recursive, not into linked
    folders, a linked file only when it stays under root. One scandir entry a file, resolved only when it is a
    link: resolving every path cost about ten system calls a file (minutes at ImageNet's 1.28M)."""
    found, todo, skip = [], [folder], len(str(root)) + 1
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
                elif (
                    os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
                    and e.is_file()
                    and (not e.is_symlink() or _inside(Path(e.path), root))
                ):
                    found.append(e.path[skip:])
    return sorted(found, key=lambda f: f.split(os.sep))  # Path order: by parts, not by characters


@dataclass
class ImageList:
    root: Path
    files: list[str]  # relative to root, sorted (class folder, then name): the index is the key's number
    labels: np.ndarray  # int64, index into the class names


def scan_class_folders(root: str | Path, classes: list[str] | None = None) -> tuple[list[str], ImageList]:
    """Class names (sorted sub-folder names, or the given ones) and the images under them."""
    root = Path(root)
    if classes is None:
        classes = sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _inside(p, root)
        )
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE or ROOT/train/CLASS/IMAGE)")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir() or not _inside(folder, root):
            continue  # a class absent from val/ is allowed; one linked from outside the root is not read
        found = _image_files(folder, root)
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root}: no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, ImageList(root, files, np.asarray(labels, dtype=np.int64))


def has_train_val(root: str | Path) -> bool:
    root = Path(root)
    return (root / "train").is_dir() and (root / "val").is_dir()


# Formats a shard keeps as they are (the reader decodes all three); any other source format is stored as PNG.
SHARD_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 90  # re-encoded (resized) JPEGs: FFCV's default; 256-px ImageNet crops at about 26 KB


def encode_for_shard(
    path: str | Path, in_chans: int, shorter_side: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[str, bytes]:
    """Image file -> (extension, bytes) as a shard stores it: the file's own bytes when it is JPEG, PNG or WebP in
    L or RGB and needs no resize; else decoded once, converted (L for in_chans=1, RGB for 3), shorter side reduced
    to `shorter_side` (never enlarged; 0 = keep the size), and re-encoded in its own format (PNG for others).
    An image above `max_pixels` is refused (ImageRefused) from its header, before any pixel is decoded; a copied
    image is still decoded once (a JPEG at 1/8 scale) so that a corrupt or truncated file is refused, not copied."""
    if "://" in str(path):  # an object-store folder (data/sources/object_store_folder.py)
        from brcd_dist import storage

        raw = storage.read_bytes(str(path))
    else:
        raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        check_pixels(im, max_pixels, str(path))
        ext = SHARD_FORMATS.get(im.format, "png")
        w, h = im.size
        scale = shorter_side / min(w, h) if shorter_side > 0 else 1.0
        if scale >= 1 and im.mode in ("L", "RGB"):
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))  # every coefficient read, 1/64 of the pixels
            im.load()  # raises on a truncated or corrupt file
            return ext, raw  # byte copy: the reader converts L <-> RGB to the configured channels
        im = im.convert("L" if in_chans == 1 else "RGB")
        if scale < 1:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        if ext == "jpg":
            im.save(buf, format="JPEG", quality=JPEG_QUALITY)
        elif ext == "webp":
            im.save(buf, format="WEBP", quality=JPEG_QUALITY)
        else:
            im.save(buf, format="PNG")
    return ext, buf.getvalue()


def encode_for_shard_or_reason(
    path: str | Path, in_chans: int, shorter_side: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[str, bytes] | str:
    """encode_for_shard, or a one-line reason for an image that cannot be used (corrupt, empty, above the pixel
    cap): such an image is skipped, counted and named, never the end of a shard run."""
    try:
        return encode_for_shard(path, in_chans, shorter_side, max_pixels)
    except ImageRefused as err:
        return str(err)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{path}: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
