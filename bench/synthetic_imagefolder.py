"""A seeded, ImageNet-shaped JPEG ImageFolder for benchmarks and the scale rehearsal (no download).

Images are crops of scikit-learn's two bundled photos (real JPEG statistics: edges, texture, smooth sky), tinted
per class, at ImageNet's typical size (about 500x375, aspect 4:3 or 3:4), saved as JPEG quality 90 with PIL.
Each class draws from its own seeded stream, so classes are written in parallel (`procs`) with the same bytes.

    python bench/synthetic_imagefolder.py DIR --classes 1000 --total 1281167 --val-per-class 50 \
        --width 64 --height 48 --procs 2      # ImageNet-1k's counts, small images
"""

from __future__ import annotations

import argparse
import multiprocessing
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)  # once a process
def _photos(size: tuple[int, int]) -> tuple[list[np.ndarray], float]:
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # 640x427
    # small images (the scale rehearsal's 64x48): crop from photos scaled down once, so a crop is not 100x the
    # output's pixels; a scale of 1 (ImageNet-sized outputs) keeps the photos as they are
    scale = min(1.0, 2 * max(size) / 427)
    if scale < 1.0:
        photos = [np.asarray(Image.fromarray(p).resize((round(640 * scale), round(427 * scale)))) for p in photos]
    return photos, scale


def class_counts(classes: int, total: int) -> np.ndarray:
    """total images over classes as evenly as possible, the first classes taking one more."""
    counts = np.full(classes, total // classes)
    counts[: total % classes] += 1
    return counts


def _write_class(job: tuple[str, int, int], root: Path, size: tuple[int, int], seed: int) -> None:
    part, c, count = job
    photos, scale = _photos(size)
    folder = root / part / f"n{c:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    tint = 0.6 + 0.8 * np.random.default_rng([seed, c]).random(3)
    rng = np.random.default_rng([seed, c, 0 if part in ("", "train") else 1])
    for i in range(count):
        path = folder / f"{part or 'img'}_{i:05d}.JPEG"
        photo = photos[int(rng.integers(len(photos)))]
        w, h = size if rng.random() < 0.7 else size[::-1]
        ch, cw = int(rng.integers(200, 427)), int(rng.integers(300, 640))
        top, left = int(rng.integers(0, 427 - ch + 1)), int(rng.integers(0, 640 - cw + 1))
        if path.exists():  # a resumed write: the draws above keep the stream in step
            continue
        if scale < 1.0:
            top, left, ch, cw = (round(v * scale) for v in (top, left, ch, cw))
        crop = photo[top : top + ch, left : left + cw].astype(np.float32) * tint
        im = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        im.save(path, format="JPEG", quality=90)


def make_image_folder(
    root: str | Path,
    *,
    classes: int,
    per_class: int | None = None,
    total: int | None = None,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    val_per_class: int = 0,
    procs: int = 1,
) -> Path:
    """ROOT/[train|val/]CLASS/NAME.jpg, per_class images a class or `total` spread over the classes; size is
    (width, height) of a landscape image (portrait: swapped). An image already there is kept."""
    if (per_class is None) == (total is None):
        raise ValueError("give one of per_class and total")
    root = Path(root)
    counts = class_counts(classes, total) if total is not None else np.full(classes, per_class)
    parts = [("train", counts), ("val", np.full(classes, val_per_class))] if val_per_class else [("", counts)]
    jobs = [(part, c, int(n[c])) for part, n in parts for c in range(classes)]
    write = partial(_write_class, root=root, size=size, seed=seed)
    if procs <= 1:
        for job in jobs:
            write(job)
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            for _ in pool.imap_unordered(write, jobs, chunksize=4):
                pass
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=None, help="images a class (default 30 unless --total)")
    p.add_argument("--total", type=int, default=None, help="images in all, spread evenly over the classes")
    p.add_argument("--val-per-class", type=int, default=0, help="also write val/ with this many a class")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--procs", type=int, default=1)
    args = p.parse_args()
    per_class = args.per_class if args.per_class is not None or args.total is not None else 30
    make_image_folder(
        args.root,
        classes=args.classes,
        per_class=per_class,
        total=args.total,
        size=(args.width, args.height),
        val_per_class=args.val_per_class,
        procs=args.procs,
    )


if __name__ == "__main__":
    main()
