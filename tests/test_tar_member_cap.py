"""A shard member above data.max_member_bytes is refused one by one: skipped unread, its sample
counted and named, the next member read; its bytes still go through the shard's sha256."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from brcd_dist.data import eval_batches, load_manifest, write_shards
from brcd_dist.data.manifest import file_sha256, save_manifest
from brcd_dist.data.tar_samples import tar_samples
from brcd_dist.storage import ShardIntegrityError

REPO = Path(__file__).resolve().parents[1]
LOADER = dict(rank=0, world_size=1, batch_size=8, num_workers=0, image_size=16, in_chans=3)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_members_group_into_samples_by_key_as_webdataset_does():
    data = _tar([("a.cls", b"1"), ("a.jpg", b"J"), ("__meta__", b"x"), ("b.cls", b"2"), ("b.seg.png", b"P")])
    samples = list(tar_samples([{"url": "u", "stream": io.BytesIO(data)}]))
    assert samples == [
        {"__key__": "a", "__url__": "u", "cls": b"1", "jpg": b"J"},
        {"__key__": "b", "__url__": "u", "cls": b"2", "seg.png": b"P"},
    ]


def test_a_member_above_the_cap_is_refused_and_the_next_member_read():
    data = _tar([("a.cls", b"1"), ("a.jpg", b"J" * 5000), ("b.cls", b"2"), ("b.jpg", b"K")])
    a, b = tar_samples([{"url": "u", "stream": io.BytesIO(data)}], max_member_bytes=4096)
    assert a["__refused__"] == ["a.jpg: 5000 bytes, above data.max_member_bytes=4096"] and "jpg" not in a
    assert b == {"__key__": "b", "__url__": "u", "cls": b"2", "jpg": b"K"}


def test_a_cap_of_zero_reads_every_member():
    data = _tar([("a.cls", b"1"), ("a.jpg", b"J" * 5000)])
    (a,) = tar_samples([{"url": "u", "stream": io.BytesIO(data)}], max_member_bytes=0)
    assert a["jpg"] == b"J" * 5000 and "__refused__" not in a


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "folder"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), color=(40 * i, 100 * c, 0)).save(root / f"c{c}" / f"{i}.png")
    return write_shards(
        tmp_path / "shards", "imagefolder", str(root), train_per_class=2, in_chans=3, samples_per_shard=100,
        progress=False,
    )  # fmt: skip


def _swap_image(manifest, split: str, big: int, *, rehash: bool = True) -> str:
    """Replace the image of the split's first sample with a member of `big` bytes (streamed from /dev/zero);
    record the new shard's sha256 unless told not to. Returns the sample's key."""
    name = manifest.splits[split].shards[0]
    path = Path(manifest.shards_dir) / name
    out = path.with_suffix(".new")
    with tarfile.open(path, mode="r|") as src, tarfile.open(out, mode="w") as dst, open("/dev/zero", "rb") as zeros:
        key = None
        for info in src:
            if key is None and info.name.endswith(".png"):
                key = info.name.rsplit(".", 1)[0]
                info.size = big
                dst.addfile(info, zeros)
            else:
                dst.addfile(info, src.extractfile(info))
    out.replace(path)
    if rehash:
        manifest.sha256[name] = file_sha256(path)
        save_manifest(manifest, manifest.shards_dir)
    return key


def _read(shards_dir, split, **kw):
    batches = eval_batches(load_manifest(shards_dir), split, **LOADER, **kw)
    keys = [k for b in batches for k in b["key"]]
    return keys, batches.stats


def test_a_shard_with_an_oversized_member_still_gives_its_other_samples(shards):
    count = shards.splits["database"].count
    key = _swap_image(shards, "database", 5000)
    keys, stats = _read(shards.shards_dir, "database", max_member_bytes=4096)
    assert len(keys) == count - 1 and key not in keys
    assert stats.bad_samples == 1 and stats.missing_samples == 0
    assert f"{key}.png: 5000 bytes, above data.max_member_bytes=4096" in stats.errors[0]


def test_a_skipped_member_still_counts_in_the_shards_sha256(shards):
    _swap_image(shards, "database", 5000, rehash=False)  # the manifest still has the old hash
    with pytest.raises(ShardIntegrityError, match="database-00000"):
        _read(shards.shards_dir, "database", max_member_bytes=4096)


def test_a_200_mb_member_is_skipped_without_reading_it_into_memory(shards):
    count = shards.splits["database"].count
    key = _swap_image(shards, "database", 200 << 20)
    probe = (
        "import resource, json, sys\n"
        "from brcd_dist.data import eval_batches, load_manifest\n"
        f"m = load_manifest({shards.shards_dir!r})\n"
        f"list(eval_batches(m, 'test_query', **{LOADER!r}))  # warm up: imports, first allocations\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"b = eval_batches(m, 'database', **{LOADER!r})\n"
        "keys = [k for x in b for k in x['key']]\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(json.dumps({'keys': keys, 'grew_kb': grew, 'bad': b.stats.bad_samples, 'errors': b.stats.errors}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/bin"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert len(out["keys"]) == count - 1 and key not in out["keys"] and out["bad"] == 1
    assert f"{200 << 20} bytes, above data.max_member_bytes={64 << 20}" in out["errors"][0]
    assert out["grew_kb"] < 50_000  # < 50 MB: the 200 MB member never sat in memory


def test_ray_data_encoding_reads_through_the_same_cap_and_checks_the_shard_hash(tmp_path):
    """batch_encoding (jobs/index.py, jobs/evaluate.py) reads shards with the one tar reader: a member above the cap
    fails the pass naming the sample, and a shard whose bytes differ from the manifest's sha256 is refused."""
    from brcd_dist.batch_encoding import _shard_samples

    shard = tmp_path / "s.tar"
    shard.write_bytes(_tar([("a.cls", b"1"), ("a.jpg", b"J"), ("b.cls", b"2"), ("b.jpg", b"K" * 5000)]))
    digest = file_sha256(shard)
    assert [k for k, _, _ in _shard_samples(str(shard), digest, 0)] == ["a", "b"]
    with pytest.raises(ValueError, match=r"s\.tar: sample b: b\.jpg: 5000 bytes, above data\.max_member_bytes=4096"):
        list(_shard_samples(str(shard), digest, 4096))
    with pytest.raises(ShardIntegrityError):
        list(_shard_samples(str(shard), "0" * 64, 0))
