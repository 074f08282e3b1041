"""Shards on a real S3-compatible store (SeaweedFS on 127.0.0.1, tests/object_store.py): written there with their
manifest, resumable; read through a link that cuts every connection, every key exactly once and the same samples
as the fault-free read; a shard gone for good fails a pass that needs every key, naming it."""

from __future__ import annotations

import uuid

import pytest
import torch
from conftest import FASHION_MNIST
from object_store import through_proxy
from test_shards import run_make_shards

from brcd_dist import storage
from brcd_dist.data import eval_batches, load_manifest, train_batches, write_shards
from brcd_dist.data.reading import IncompleteReadError

LOADER = dict(image_size=32, in_chans=1)


def _epoch(manifest, **kw):
    batches = train_batches(
        manifest, "train", rank=0, world_size=1, batch_size=16, num_workers=1, epoch=0, seed=3, **LOADER, **kw
    )
    return list(batches), batches.stats


def _eval(manifest, split="test_query"):
    batches = eval_batches(manifest, split, rank=0, world_size=1, batch_size=64, num_workers=1, **LOADER)
    out = list(batches)
    batches.raise_if_incomplete()
    return out


def test_shards_and_manifest_are_written_to_the_bucket(s3_shards):
    manifest = load_manifest(s3_shards)
    names = storage.listdir(s3_shards)
    assert "manifest.json" in names and set(manifest.shard_files()) <= set(names)
    assert "shards.progress.json" not in names  # a finished run leaves no progress record


def test_make_shards_job_writes_shards_and_manifest_to_the_bucket_and_a_rerun_keeps_them(
    object_store, monkeypatch, capsys
):
    url = object_store.url(f"job-{uuid.uuid4().hex[:6]}")
    args = [f"data.shards_url={url}", "data.train_per_class=2", "data.samples_per_shard=25", "data.max_images=100"]
    assert run_make_shards(args, monkeypatch) == 0
    assert capsys.readouterr().out.startswith(f"{url}: fashion_mnist, ")
    manifest = load_manifest(url)
    names = storage.listdir(url)
    assert "manifest.json" in names and set(manifest.shard_files()) <= set(names)
    written = {n: storage.modified(storage.join(url, n)) for n in manifest.shard_files()}
    uploads = []
    monkeypatch.setattr(storage, "upload", lambda src, dst: uploads.append(dst))
    assert run_make_shards(args, monkeypatch) == 0  # the same parameters: every shard kept, none uploaded again
    assert uploads == [] and {n: storage.modified(storage.join(url, n)) for n in written} == written


def test_an_interrupted_upload_resumes_writing_only_the_missing_shards(object_store, monkeypatch):
    url = object_store.url(f"resume-{uuid.uuid4().hex[:6]}")
    args = dict(train_per_class=2, max_images=100, samples_per_shard=10, progress=False)
    uploads = []
    real_upload = storage.upload

    def dying_upload(src, dst):
        if len(uploads) == 3:
            raise ConnectionError("link lost")
        uploads.append(dst)
        real_upload(src, dst)

    monkeypatch.setattr(storage, "upload", dying_upload)
    with pytest.raises(ConnectionError):
        write_shards(url, "fashion_mnist", FASHION_MNIST, **args)
    monkeypatch.setattr(storage, "upload", lambda src, dst: (uploads.append(dst), real_upload(src, dst)))
    manifest = write_shards(url, "fashion_mnist", FASHION_MNIST, **args)
    total = len(manifest.shard_files())
    assert len(uploads) == total  # 3 before the failure + the rest after it, none twice
    assert len(set(uploads)) == total


def test_reading_through_a_cutting_link_gives_every_key_once_and_the_same_samples(object_store, s3_shards):
    manifest = load_manifest(s3_shards)
    clean, clean_stats = _epoch(manifest)
    with through_proxy(object_store, cut_after=30_000) as proxy:
        cut, cut_stats = _epoch(manifest)
    assert proxy.cuts >= 3  # shards are ~100 kB: each was cut at least once
    keys = [k for b in cut for k in b["key"]]
    assert sorted(keys) == sorted(manifest.splits["train"].keys)  # every key, exactly once
    assert cut_stats.skipped == clean_stats.skipped == 0
    assert [b["key"] for b in cut] == [b["key"] for b in clean]
    assert all(torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"]) for a, b in zip(cut, clean))


def test_a_shard_gone_for_good_fails_an_every_key_pass_naming_it(object_store, s3_shards):
    manifest = load_manifest(s3_shards)
    copy = object_store.url(f"gone-{uuid.uuid4().hex[:6]}")
    for name in storage.listdir(s3_shards):
        storage.write_bytes(storage.join(copy, name), storage.read_bytes(storage.join(s3_shards, name)))
    victim = manifest.splits["test_query"].shards[1]
    storage.remove(storage.join(copy, victim))
    with pytest.raises(IncompleteReadError, match=f"{victim}"):
        _eval(load_manifest(copy))


def test_a_shard_gone_for_good_is_skipped_and_counted_in_training(object_store, s3_shards):
    manifest = load_manifest(s3_shards)
    copy = object_store.url(f"gone-{uuid.uuid4().hex[:6]}")
    for name in storage.listdir(s3_shards):
        storage.write_bytes(storage.join(copy, name), storage.read_bytes(storage.join(s3_shards, name)))
    victim = manifest.splits["train"].shards[0]
    storage.remove(storage.join(copy, victim))
    _, stats = _epoch(load_manifest(copy))
    assert stats.missing_samples == manifest.splits["train"].shard_counts[0]
    assert any(victim in e for e in stats.errors)


@pytest.mark.parametrize("with_val", [False, True])
def test_an_image_folder_on_the_bucket_gives_the_shards_of_its_local_copy(object_store, tmp_path, with_val):
    """data.source=object_store_folder (data/sources/object_store_folder.py) lists and reads the folder through the
    storage layer: same classes, keys, split and bytes as data.source=imagefolder on a local copy."""
    from test_shards import make_image_folder

    local = make_image_folder(tmp_path / "folder", val=with_val)
    prefix = object_store.url(f"folder-{uuid.uuid4().hex[:6]}")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload(str(path), storage.join(prefix, str(path.relative_to(local))))
    kw = dict(seed=0, train_per_class=2, samples_per_shard=4, in_chans=3, shorter_side=20, progress=False)
    on_disk = write_shards(tmp_path / "a", "imagefolder", str(local), **kw)
    from_bucket = write_shards(tmp_path / "b", "object_store_folder", prefix, **kw)
    assert from_bucket.sha256 == on_disk.sha256 and from_bucket.classes == on_disk.classes
    assert {n: s.keys for n, s in from_bucket.splits.items()} == {n: s.keys for n, s in on_disk.splits.items()}


def test_an_empty_prefix_is_refused_in_one_line(object_store, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.source_path='s3://.*/nothing-here': nothing there"):
        write_shards(tmp_path / "s", "object_store_folder", object_store.url("nothing-here"), progress=False)
