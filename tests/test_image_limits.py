"""Data that cannot hurt the shard writer or the readers: symlinks that leave the
ImageFolder root are not followed; an image above the pixel cap is refused from its header, without decoding it;
a corrupt or empty image is skipped, counted and named instead of ending the run."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from brcd_dist.data import imagefolder
from brcd_dist.data.imagefolder import (
    ImageRefused,
    check_pixels,
    encode_for_shard,
    scan_class_folders,
)

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, per_class: dict) -> Path:
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (12, 12), color=(i * 20, 0, 0)).save(root / cls / f"{i}.png")
    return root


def test_symlinks_leaving_the_root_are_not_followed(tmp_path):
    root = _folder(tmp_path / "root", {"a": 2, "b": 2})
    outside = _folder(tmp_path / "outside", {"secret": 3})
    (root / "c_linked").symlink_to(outside / "secret", target_is_directory=True)
    (root / "a" / "leak.png").symlink_to(outside / "secret" / "0.png")
    (root / "b" / "inside.png").symlink_to(root / "a" / "0.png")  # a link that stays inside is kept
    classes, images = scan_class_folders(root)
    assert classes == ["a", "b"]
    assert sorted(images.files) == ["a/0.png", "a/1.png", "b/0.png", "b/1.png", "b/inside.png"]


def test_images_are_listed_in_path_order_through_sub_folders_and_links(tmp_path):
    """Keys are numbered in this order: by path parts, so 'x/b' comes before 'x-c' (by characters it would not);
    sub-folders are read, folders linked inside a class are not, and a link to a file inside the root is."""
    root = _folder(tmp_path / "root", {"a": 1})
    for rel in ("a/x/b.png", "a/x-c.png", "a/x/deep/0.JPG", "a/y.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not decoded when listing")
    (root / "a" / "linked").symlink_to(root / "a" / "x", target_is_directory=True)
    (root / "a" / "z.png").symlink_to(root / "a" / "0.png")
    _, images = scan_class_folders(root)
    assert images.files == ["a/0.png", "a/x/b.png", "a/x/deep/0.JPG", "a/x-c.png", "a/z.png"]


def test_image_above_the_pixel_cap_is_refused_without_decoding(tmp_path):
    # 12000 x 12000 = 144 megapixels in a PNG of a few hundred kB: decoding it would take 0.4 GB (RGB)
    path = tmp_path / "bomb.png"
    code = f"from PIL import Image; Image.new('L', (12000, 12000)).save({str(path)!r}, optimize=False)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert path.stat().st_size < 1_000_000
    probe = (
        "import resource, sys; from brcd_dist.data.imagefolder import encode_for_shard, ImageRefused\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"try:\n    encode_for_shard({str(path)!r}, 3, 36)\nexcept ImageRefused as e:\n    print('refused', e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    refused, grew_kb = done.stdout.strip().splitlines()
    assert refused.startswith("refused ") and "12000x12000 = 144000000 pixels, above data.max_image_pixels" in refused
    assert int(grew_kb) < 50_000  # < 50 MB: the pixels were never decoded


def test_pixel_cap_is_configurable_and_zero_turns_it_off(tmp_path):
    Image.new("L", (100, 100)).save(tmp_path / "x.png")
    with pytest.raises(ImageRefused, match="100x100 = 10000 pixels, above data.max_image_pixels=9999"):
        encode_for_shard(tmp_path / "x.png", 1, 32, max_pixels=9999)
    assert encode_for_shard(tmp_path / "x.png", 1, 32, max_pixels=0)


def test_reader_refuses_a_bomb_inside_a_shard_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, format="PNG")
    image = Image.open(io.BytesIO(buf.getvalue()))
    with pytest.raises(ImageRefused, match="train-00001: 8000x8000"):
        check_pixels(image, imagefolder.DEFAULT_MAX_IMAGE_PIXELS, "train-00001")


def test_corrupt_and_empty_images_are_skipped_counted_and_named(tmp_path, caplog):
    from brcd_dist.data import write_shards

    root = _folder(tmp_path / "root", {"a": 6, "b": 6})
    (root / "a" / "empty.png").write_bytes(b"")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        manifest = write_shards(
            tmp_path / "shards",
            "imagefolder",
            str(root),
            train_per_class=4,
            samples_per_shard=4,
            in_chans=3,
            shorter_side=8,
            progress=False,
        )
    database = manifest.splits["database"]
    assert database.count == sum(database.shard_counts) == len(database.keys)
    assert database.count + manifest.splits["val_query"].count + manifest.splits["test_query"].count == 12
    text = caplog.text
    assert "empty.png" in text and "truncated.png" in text and "image(s) skipped" in text


def test_a_truncated_jpeg_is_refused_where_a_good_one_is_copied_byte_for_byte(tmp_path):
    from brcd_dist.data.imagefolder import encode_for_shard_or_reason

    Image.new("RGB", (64, 48), color=(200, 30, 10)).save(tmp_path / "good.jpg", quality=90)
    good = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    assert encode_for_shard_or_reason(tmp_path / "good.jpg", 3, 0) == ("jpg", good)
    reason = encode_for_shard_or_reason(tmp_path / "cut.jpg", 3, 0)
    assert isinstance(reason, str) and "cut.jpg" in reason


def test_a_ray_shard_task_skips_counts_and_names_a_corrupt_image_too(tmp_path):
    from brcd_dist.data.shard_writer import write_one_shard

    root = _folder(tmp_path / "root", {"a": 2})
    (root / "a" / "empty.png").write_bytes(b"")
    samples = [
        ("k0", str(root / "a" / "0.png"), 0),
        ("k1", str(root / "a" / "empty.png"), 0),
        ("k2", str(root / "a" / "1.png"), 0),
    ]
    row = write_one_shard(str(tmp_path), "train-000000.tar", samples, 3, 0)
    assert row["keys"] == ["k0", "k2"] and (tmp_path / "train-000000.tar").is_file()
    assert len(row["skipped"]) == 1 and "empty.png" in row["skipped"][0]
