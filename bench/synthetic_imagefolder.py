"""A seeded, ImageNet-shaped JPEG ImageFolder for benchmarks and the scale rehearsal (no download).

Images are crops of scikit-learn's two bundled photos (real JPEG statistics: edges, texture, smooth sky), tinted
per class, at ImageNet's typical size (about 500x375, aspect 4:3 or 3:4), saved as JPEG quality 90 with PIL.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def make_image_folder(
    root: str | Path,
    *,
    classes: int,
    per_class: int,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    val_per_class: int = 0,
) -> Path:
    """ROOT/[train|val/]CLASS/NAME.jpg; size is (width, height) of a landscape image (portrait: swapped)."""
    root = Path(root)
    photos = _photos()  # 640x427
    # small images (the scale rehearsal's 64x48): crop from photos scaled down once, so a crop is not 100x the
    # output's pixels; a scale of 1 (ImageNet-sized outputs) keeps the images exactly as before
    scale = min(1.0, 2 * max(size) / 427)
    if scale < 1.0:
        photos = [np.asarray(Image.fromarray(p).resize((round(640 * scale), round(427 * scale)))) for p in photos]
    rng = np.random.default_rng(seed)
    parts = [("train", per_class), ("val", val_per_class)] if val_per_class else [("", per_class)]
    for part, count in parts:
        for c in range(classes):
            folder = root / part / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            tint = 0.6 + 0.8 * np.random.default_rng([seed, c]).random(3)
            for i in range(count):
                path = folder / f"{part or 'img'}_{i:05d}.JPEG"
                if path.exists():
                    continue
                photo = photos[int(rng.integers(len(photos)))]
                w, h = size if rng.random() < 0.7 else size[::-1]
                ch, cw = int(rng.integers(200, 427)), int(rng.integers(300, 640))
                top, left = int(rng.integers(0, 427 - ch + 1)), int(rng.integers(0, 640 - cw + 1))
                if scale < 1.0:
                    top, left, ch, cw = (round(v * scale) for v in (top, left, ch, cw))
                crop = photo[top : top + ch, left : left + cw].astype(np.float32) * tint
                im = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
                im.save(path, format="JPEG", quality=90)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    args = p.parse_args()
    make_image_folder(args.root, classes=args.classes, per_class=args.per_class, size=(args.width, args.height))


if __name__ == "__main__":
    main()
