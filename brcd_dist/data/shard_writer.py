"""Writing one shard, and the shards of a plan: in this process (the source's encoding, with a pool), or one Ray task
per shard across a cluster's CPUs (jobs/make_shards.py --ray). Both write the same bytes; each finished shard is
handed to `record` with its sha256, the keys written and the reasons of images skipped."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from brcd_dist import storage
from brcd_dist.data import imagefolder
from brcd_dist.data.manifest import file_sha256
from brcd_dist.data.sources import ImageSet


def _write_tar(path: str, rows: Iterable[tuple[str, int, tuple[str, bytes] | str]]) -> tuple[list[str], list[str]]:
    """One tar at `path` from rows (key, label, (extension, bytes) or the reason the image is skipped: corrupt,
    empty, above the pixel cap); returns (keys written, reasons skipped)."""
    keys, skipped = [], []
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        for key, label, item in rows:
            if isinstance(item, str):
                skipped.append(item)
                continue
            ext, data = item
            sink.write({"__key__": key, ext: data, "cls": str(int(label)).encode()})
            keys.append(key)
    return keys, skipped


@contextlib.contextmanager
def _shard_file(out: str, fname: str) -> Iterator[str]:
    """A temporary path to write shard `fname` at; when the block ends it becomes out/fname whole (renamed in a
    local directory, uploaded to an object store) or, on error, nothing."""
    local = storage.is_local(out)
    if local:
        os.makedirs(out, exist_ok=True)  # a Ray task may run on a node that has not seen the directory yet
    with tempfile.TemporaryDirectory(prefix="brcd-shard-") as scratch:
        tmp = os.path.join(out if local else scratch, f"{fname}.{os.getpid()}.tmp")
        try:
            yield tmp
            if local:
                os.replace(tmp, os.path.join(out, fname))
            else:
                storage.upload(tmp, storage.join(out, fname))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _write_shard(out: str, fname: str, rows: Iterable[tuple[str, int, tuple[str, bytes] | str]]) -> dict:
    """Shard `fname` in `out` from rows as _write_tar takes them; returns its name, sha256, the keys written and the
    reasons of the images skipped (what write_shards records)."""
    with _shard_file(out, fname) as tmp:
        keys, skipped = _write_tar(tmp, rows)
        sha = file_sha256(tmp)
    return {"name": fname, "sha256": sha, "keys": keys, "skipped": skipped}


def write_one_shard(
    out: str,
    fname: str,
    samples: list[tuple[str, str, int]],
    in_chans: int,
    shorter_side: int,
    max_pixels: int = imagefolder.DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """One ImageFolder shard from [(key, image path, label)], encoded here (a Ray task's body: --ray)."""
    rows = (
        (key, label, imagefolder.encode_for_shard_or_reason(path, in_chans, shorter_side, max_pixels))
        for key, path, label in samples
    )
    return _write_shard(out, fname, rows)


def write_serial(
    out: str, todo: list[tuple[str, str, np.ndarray]], sides: dict[str, ImageSet], bar: tqdm, record
) -> None:
    """The shards in `todo` [(split, file name, side indices)], in this process; each split's images are encoded
    in one stream (the side's pool, if any, stays up across its shards)."""
    for name in dict.fromkeys(split for split, _, _ in todo):
        images = sides[name]
        mine = [(fname, part) for split, fname, part in todo if split == name]
        encoded = iter(images.encode_many(np.concatenate([part for _, part in mine])))
        for fname, part in mine:

            def rows(part=part):
                for j in part:
                    bar.update(1)
                    yield images.keys[int(j)], int(images.labels[int(j)]), next(encoded)

            record(name, _write_shard(out, fname, rows()), 0)


def write_with_ray(
    out: str,
    todo: list[tuple[str, str, np.ndarray]],
    sides: dict[str, ImageSet],
    bar: tqdm,
    record,
    encoding: tuple[int, int, int],
    address: str,
) -> None:
    """The shards in `todo`, one Ray task (one CPU) each on the Ray cluster at `address` (joined unless this
    process is in one already), at most twice the cluster's CPUs in flight; each is recorded as it finishes. The
    tasks read the images by path."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address)
    task = ray.remote(num_cpus=1)(write_one_shard)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue, pending = list(todo), {}
    while queue or pending:
        while queue and len(pending) < limit:
            name, fname, part = queue.pop(0)
            side = sides[name]
            samples = [(side.keys[int(j)], side.paths[int(j)], int(side.labels[int(j)])) for j in part]
            pending[task.remote(out, fname, samples, *encoding)] = (name, len(part))
        ready, _ = ray.wait(list(pending), num_returns=1)
        name, n = pending.pop(ready[0])
        record(name, ray.get(ready[0]), n)
