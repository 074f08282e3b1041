"""Shard writing: IDX reading, the seeded split of DESIGN §3, the manifest, re-use and refusal.

Shards are read back here with Python's tarfile, not with our reader, so the check is independent of
brcd_dist.data.reading. Fashion-MNIST tests use the real IDX files, a subset (max_images) where writing all
75,000 images would only make the test slower; the split of the full files is checked without writing.
"""

import gzip
import io
import runpy
import struct
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brcd_dist.config import Config
from brcd_dist.data import ShardsMismatchError, ensure_shards, load_manifest, verify_shards, write_shards
from brcd_dist.data.idx import IdxFormatError, load_fashion_mnist, read_idx
from brcd_dist.data.shards import shard_sizes
from brcd_dist.data.splits import make_splits

FMNIST = "/usr/share/datasets/fashion-mnist"
REPO = Path(__file__).resolve().parents[1]
SMALL = dict(train_per_class=20, val_fraction=0.5, samples_per_shard=150, max_images=1000, progress=False)

needs_fmnist = pytest.mark.skipif(
    not Path(FMNIST, "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


def read_tar(path):
    """[(key, image bytes, label)] in stored order, with the standard library only."""
    out, current = [], {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            current.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key, files in current.items():
        image = next(files[e] for e in ("jpg", "png", "webp") if e in files)
        out.append((key, image, int(files["cls"])))
    return out


def read_split(shards_dir, split):
    return [s for name in split.shards for s in read_tar(Path(shards_dir) / name)]


@pytest.fixture(scope="module")
def fmnist_arrays():
    return load_fashion_mnist(FMNIST)


@pytest.fixture(scope="module")
def fmnist_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm")
    return out, write_shards(out, "fashion_mnist", FMNIST, seed=0, **SMALL)


def make_image_folder(root: Path, n_per_class=(7, 5, 6), size=(40, 30), val: bool = False):
    """Random RGB PNG/JPEG images, one folder per class (under train/ and val/ when val=True)."""
    rng = np.random.default_rng(0)
    parts = [("train", n_per_class), ("val", (3, 2, 2))] if val else [("", n_per_class)]
    for part, counts in parts:
        for c, n in enumerate(counts):
            folder = root / part / f"class_{'abc'[c]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


# ----------------------------------------------------------------------------- IDX


def test_read_idx_parses_header_and_data(tmp_path):
    data = bytes(range(24))
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3i", 2, 3, 4) + data)
    arr = read_idx(path)
    assert arr.shape == (2, 3, 4) and arr.dtype == np.uint8
    assert arr[1, 2, 3] == 23 and arr[0, 1, 0] == 4


def test_read_idx_rejects_bad_magic_and_short_data(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">i", 3) + b"abc")
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">i", 5) + b"abc")
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(short)


@needs_fmnist
def test_fashion_mnist_idx_files_have_the_known_shapes(fmnist_arrays):
    assert fmnist_arrays["train_images"].shape == (60000, 28, 28)
    assert fmnist_arrays["test_images"].shape == (10000, 28, 28)
    assert np.bincount(fmnist_arrays["train_labels"]).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- split


@needs_fmnist
def test_full_fashion_mnist_split_follows_design_protocol(fmnist_arrays):
    """DESIGN §3: 500 per class from the 60k, database = all 60k, 10k test images -> 5k + 5k queries."""
    labels = fmnist_arrays["train_labels"]
    s = make_splits(labels, 10000, train_per_class=500, val_fraction=0.5, seed=0)
    assert np.bincount(labels[s["train"]]).tolist() == [500] * 10
    assert len(set(s["train"].tolist())) == 5000
    assert sorted(s["database"].tolist()) == list(range(60000))
    assert len(s["val_query"]) == len(s["test_query"]) == 5000
    assert sorted(np.concatenate([s["val_query"], s["test_query"]]).tolist()) == list(range(10000))


def test_split_depends_on_seed_only_where_it_should():
    labels = np.repeat(np.arange(4), 50)
    a = make_splits(labels, 100, train_per_class=10, val_fraction=0.3, seed=3)
    b = make_splits(labels, 100, train_per_class=10, val_fraction=0.3, seed=3)
    c = make_splits(labels, 100, train_per_class=10, val_fraction=0.3, seed=4)
    d = make_splits(labels, 100, train_per_class=20, val_fraction=0.3, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"]) and not np.array_equal(a["val_query"], c["val_query"])
    assert np.array_equal(a["val_query"], d["val_query"])  # the query split ignores train_per_class
    assert len(a["val_query"]) == 30


# ----------------------------------------------------------------------------- Fashion-MNIST shards


@needs_fmnist
def test_fashion_mnist_shards_hold_what_the_manifest_says(fmnist_small, fmnist_arrays):
    out, m = fmnist_small
    assert (m.source, m.num_classes, m.image_size, m.in_chans) == ("fashion_mnist", 10, 28, 1)
    assert set(m.splits) == {"train", "database", "val_query", "test_query"}
    for name, split in m.splits.items():
        samples = read_split(out, split)
        assert [k for k, _, _ in samples] == split.keys, name
        assert [y for _, _, y in samples] == split.labels, name
        assert [len(read_tar(out / s)) for s in split.shards] == split.shard_counts, name
        assert split.count == len(samples) == sum(split.shard_counts)
        assert all(c <= 150 for c in split.shard_counts)
        for key, png, label in samples[:40]:  # image and label are the IDX ones of the key's index
            part, index = key.split("-")
            assert label == fmnist_arrays[f"{part}_labels"][int(index)]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), fmnist_arrays[f"{part}_images"][int(index)])
    assert verify_shards(m, out) == []


@needs_fmnist
def test_fashion_mnist_split_keys_relate_as_designed(fmnist_small):
    _, m = fmnist_small
    s = m.splits
    assert Counter(s["train"].labels) == {c: 20 for c in range(10)}
    assert set(s["train"].keys) <= set(s["database"].keys)  # a train image keeps its database key
    assert sorted(s["database"].keys) == [f"train-{i:05d}" for i in range(1000)]
    queries = s["val_query"].keys + s["test_query"].keys
    assert sorted(queries) == [f"test-{i:05d}" for i in range(1000)] and len(s["val_query"].keys) == 500


@needs_fmnist
def test_same_seed_gives_identical_shards_other_seed_another_split(fmnist_small, tmp_path):
    _, m = fmnist_small
    again = write_shards(tmp_path / "a", "fashion_mnist", FMNIST, seed=0, **SMALL)
    other = write_shards(tmp_path / "b", "fashion_mnist", FMNIST, seed=1, **SMALL)
    assert again.sha256 == m.sha256  # byte-identical tar files
    assert again.digest() == m.digest()
    assert other.splits["train"].keys != m.splits["train"].keys
    assert other.splits["val_query"].keys != m.splits["val_query"].keys


@needs_fmnist
def test_other_seed_in_same_directory_is_refused_in_one_line(fmnist_small, tmp_path):
    out = tmp_path / "s"
    first = write_shards(out, "fashion_mnist", FMNIST, seed=0, **SMALL)
    with pytest.raises(ShardsMismatchError) as err:
        write_shards(out, "fashion_mnist", FMNIST, seed=1, **SMALL)
    assert isinstance(err.value, ValueError)
    assert "seed=0" in str(err.value) and "seed=1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ShardsMismatchError, match="train_per_class"):
        write_shards(out, "fashion_mnist", FMNIST, seed=0, **{**SMALL, "train_per_class": 21})
    assert load_manifest(out).digest() == first.digest() and verify_shards(first, out) == []


@needs_fmnist
def test_same_parameters_reuse_intact_shards_and_rewrite_damaged_ones(tmp_path):
    out = tmp_path / "s"
    first = write_shards(out, "fashion_mnist", FMNIST, seed=0, **SMALL)
    shard = out / first.splits["database"].shards[1]
    mtime = shard.stat().st_mtime_ns
    write_shards(out, "fashion_mnist", FMNIST, seed=0, **SMALL)
    assert shard.stat().st_mtime_ns == mtime  # verified, not rewritten
    shard.write_bytes(shard.read_bytes()[:1000])  # damage it
    assert verify_shards(first, out) == [shard.name]
    again = write_shards(out, "fashion_mnist", FMNIST, seed=0, **SMALL)
    assert verify_shards(again, out) == [] and again.sha256 == first.sha256


# ----------------------------------------------------------------------------- ImageFolder


def test_image_folder_without_split_folders_holds_out_queries_by_seed(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    m = write_shards(
        tmp_path / "s",
        "imagefolder",
        str(root),
        seed=0,
        train_per_class=3,
        val_fraction=0.5,
        samples_per_shard=4,
        in_chans=3,
        shorter_side=27,
        holdout_fraction=0.2,
        progress=False,
    )
    assert m.classes == ["class_a", "class_b", "class_c"] and (m.in_chans, m.image_size) == (3, 27)
    held = m.splits["val_query"].keys + m.splits["test_query"].keys
    assert len(held) == 1 + 1 + 1  # round(0.2 * n_c) per class, at least one: 7, 5, 6 images
    assert not set(held) & set(m.splits["database"].keys)
    assert sorted(held + m.splits["database"].keys) == [f"img-{i:05d}" for i in range(18)]
    assert Counter(m.splits["train"].labels) == {0: 3, 1: 3, 2: 3}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))  # the key's number: sorted listing
    for name, split in m.splits.items():
        samples = read_split(tmp_path / "s", split)
        assert [(k, y) for k, _, y in samples] == list(zip(split.keys, split.labels)), name
        for key, png, label in samples:
            path = files[int(key.split("-")[1])]
            assert path.startswith(m.classes[label])
            im = Image.open(io.BytesIO(png))
            assert im.mode == "RGB" and min(im.size) == 27  # 30 px shorter side reduced to 27
            assert im.format == ("PNG" if Path(path).suffix == ".png" else "JPEG")  # the source's format


def test_image_folder_with_train_and_val_uses_them(tmp_path):
    root = make_image_folder(tmp_path / "imgs", val=True, size=(64, 48))
    m = write_shards(
        tmp_path / "s",
        "imagefolder",
        str(root),
        seed=0,
        train_per_class=2,
        val_fraction=0.5,
        samples_per_shard=5,
        in_chans=1,
        shorter_side=36,
        progress=False,
    )
    assert sorted(m.splits["database"].keys) == [f"train-{i:05d}" for i in range(18)]
    assert sorted(m.splits["val_query"].keys + m.splits["test_query"].keys) == [f"val-{i:05d}" for i in range(7)]
    assert m.splits["val_query"].count == 4  # round(0.5 * 7)
    assert Counter(m.splits["train"].labels) == {0: 2, 1: 2, 2: 2}
    key, png, _ = read_split(tmp_path / "s", m.splits["test_query"])[0]
    im = Image.open(io.BytesIO(png))
    assert im.mode == "L" and im.size == (round(64 * 36 / 48), 36)


def test_jpeg_and_png_sources_are_stored_byte_for_byte_when_no_resize_is_asked(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    m = write_shards(
        tmp_path / "s",
        "imagefolder",
        str(root),
        seed=0,
        train_per_class=3,
        samples_per_shard=4,
        in_chans=3,
        shorter_side=0,
        progress=False,
    )
    assert m.image_size == 0
    files = sorted(p for p in root.rglob("*.*"))
    for key, data, _ in read_split(tmp_path / "s", m.splits["database"]):
        assert data == files[int(key.split("-")[1])].read_bytes()


def test_resize_keeps_a_jpeg_source_jpeg_at_the_asked_shorter_side(tmp_path):
    from brcd_dist.data.imagefolder import encode_for_shard

    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    ext, data = encode_for_shard(path, 3, 256)
    im = Image.open(io.BytesIO(data))
    assert (ext, im.format, im.mode, im.size) == ("jpg", "JPEG", "RGB", (341, 256))
    assert encode_for_shard(path, 3, 300) == ("jpg", path.read_bytes())  # already small enough: a byte copy


def test_sources_other_than_jpeg_png_webp_are_stored_as_png(tmp_path):
    from brcd_dist.data.imagefolder import encode_for_shard

    path = tmp_path / "x.bmp"
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(path)
    ext, data = encode_for_shard(path, 3, 0)
    assert ext == "png" and Image.open(io.BytesIO(data)).size == (12, 10)


@pytest.mark.parametrize(
    "n,cap,readers,sizes",
    [
        (10, 4, 0, [4, 4, 2]),  # no minimum: full shards, the rest last
        (10, 4, 5, [2, 2, 2, 2, 2]),  # 5 readers: 5 shards of 2, not 3 of up to 4
        (11, 4, 2, [4, 4, 3]),  # the cap still holds: 3 shards, near-equal
        (3, 4, 8, [1, 1, 1]),  # never an empty shard
    ],
)
def test_shard_sizes_give_every_reader_a_shard_within_the_cap(n, cap, readers, sizes):
    assert shard_sizes(n, cap, readers) == sizes


def test_readers_cut_every_split_into_at_least_that_many_shards_and_other_readers_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_per_class=(12, 10, 10))
    kw = dict(seed=0, train_per_class=3, samples_per_shard=100, in_chans=3, progress=False)
    m = write_shards(tmp_path / "s", "imagefolder", str(root), readers=4, **kw)
    assert all(len(s.shards) == 4 for s in m.splits.values() if s.count >= 4)
    with pytest.raises(ShardsMismatchError, match="shard_readers=2"):
        write_shards(tmp_path / "s", "imagefolder", str(root), readers=2, **kw)


def test_encoding_in_a_process_pool_gives_the_same_shards(tmp_path, monkeypatch):
    from brcd_dist.data.sources import imagefolder as source

    root = make_image_folder(tmp_path / "imgs", n_per_class=(12, 10, 10))
    kw = dict(seed=0, train_per_class=3, samples_per_shard=7, in_chans=3, shorter_side=27, progress=False)
    serial = write_shards(tmp_path / "a", "imagefolder", str(root), num_procs=1, **kw)
    monkeypatch.setattr(source, "POOL_MIN_IMAGES", 4)
    pooled = write_shards(tmp_path / "b", "imagefolder", str(root), num_procs=2, **kw)
    assert pooled.sha256 == serial.sha256


def test_ensure_shards_makes_then_reuses_from_config(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    cfg = Config()
    d = cfg.data
    d.source, d.source_path, d.shards_dir = "imagefolder", str(root), str(tmp_path / "s")
    d.train_per_class, d.samples_per_shard, d.in_chans, d.image_size = 2, 6, 3, 16
    made = ensure_shards(cfg)
    assert made.splits["train"].count == 6 and made.seed == d.split_seed
    assert ensure_shards(cfg).digest() == made.digest()
    d.source = "shards"  # "already made": the manifest is used as is
    assert ensure_shards(cfg).digest() == made.digest()
    d.source, d.split_seed = "imagefolder", 7
    with pytest.raises(ShardsMismatchError):
        ensure_shards(cfg)


def run_make_shards(args, monkeypatch) -> int:
    """jobs/make_shards.py as `python jobs/make_shards.py ARGS` would run it, in this process (saves the
    seconds a fresh interpreter spends importing torch and timm)."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    monkeypatch.setattr(sys, "argv", ["make_shards.py", *args])
    try:
        runpy.run_path(str(REPO / "jobs" / "make_shards.py"), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_make_shards_cli_prints_counts_and_refuses_another_seed(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "imgs")
    args = [
        "data.source=imagefolder",
        f"data.source_path={root}",
        f"data.shards_dir={tmp_path / 's'}",
        "data.train_per_class=2",
        "data.samples_per_shard=8",
        "data.in_chans=3",
    ]
    assert run_make_shards(args, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "database" in out and " 15 images" in out and "done in" in out
    assert run_make_shards(args + ["data.split_seed=5"], monkeypatch) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "seed=0" in last and "seed=5" in last


@needs_fmnist
def test_progress_false_draws_no_bar_and_progress_true_draws_one(tmp_path, capsys):
    write_shards(tmp_path / "quiet", "fashion_mnist", FMNIST, seed=0, **SMALL)
    assert "shards ->" not in capsys.readouterr().err
    write_shards(tmp_path / "shown", "fashion_mnist", FMNIST, seed=0, **{**SMALL, "progress": True})
    assert "shards ->" in capsys.readouterr().err
