"""Writing WebDataset tar shards and their manifest (DESIGN §1 `make_shards`, §3 split).

Every split is written in a seeded shuffled order, `samples_per_shard` samples a shard, as
`{split}-{i:06d}.tar`; a sample is {"__key__": stable key, EXT: image bytes, "cls": label}, EXT "jpg", "png" or
"webp". Shards keep the source's encoded bytes (DESIGN §5): an ImageFolder's JPEG stays JPEG, byte for byte unless
a one-time resize to a shorter side is asked (`shorter_side`, then re-encoded as JPEG); IDX arrays, which have no
encoding, become PNG. A training image has the same key in "train" and "database" (pseudo-labels are keyed by
it, DESIGN §2). Tar entries carry mtime 0 and encoding is deterministic, so the same parameters give
byte-identical shards (and hashes) again.

Shard sizes: `samples_per_shard` at most; with `readers` > 0 (the expected ranks x loader workers), a split
has at least that many shards (near-equal sizes), so that every loader worker of every rank has its own.

Writers: this process (encoding with a pool), or with `ray_address` one Ray task per shard across a cluster's
CPUs (jobs/make_shards.py --ray). Both write the same bytes, record each finished shard's sha256 in
shards.progress.json, and so resume the same way. Why not Ray Data (read_binary_files -> write_webdataset): its
writer names and fills files by blocks, so the seeded split's sample -> shard -> position layout, the shard names
and the per-shard counts that the epoch plan reads would have to be rebuilt after the fact, and it has no
per-file resume (a failed job rewrites everything).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from brcd_dist import storage
from brcd_dist.data import imagefolder, splits
from brcd_dist.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from brcd_dist.data.manifest import (
    Manifest,
    ShardsMismatchError,
    SplitInfo,
    check_same_params,
    file_sha256,
    load_manifest,
    manifest_location,
    manifest_path,
    save_manifest,
)
from brcd_dist.data.tar_samples import shard_samples

log = logging.getLogger(__name__)

SOURCES = ("fashion_mnist", "imagefolder")
FASHION_MNIST_SIZE = 28
DEFAULT_HOLDOUT = splits.DEFAULT_HOLDOUT  # (in splits.py: config validation reads it without torch)
POOL_MIN_IMAGES = 1000  # fewer images: encoding in this process beats starting a pool


@dataclass
class _ImageSet:
    """One side of a source (training or test images): keys, labels, and how to get image i's stored bytes."""

    keys: list[str]
    labels: np.ndarray
    encode_many: Callable[[np.ndarray], Iterable[tuple[str, bytes]]]  # indices -> (extension, bytes), in order
    paths: list[str] | None = None  # ImageFolder: image i's file (what the Ray tasks of --ray read)


@dataclass
class _Source:
    classes: list[str]
    image_size: int
    in_chans: int
    train: _ImageSet
    test: _ImageSet


def _keys(prefix: str, indices: Iterable[int], n: int) -> list[str]:
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{prefix}-{i:0{width}d}" for i in indices]


def _limit(n: int, max_images: int) -> int:
    return min(n, max_images) if max_images > 0 else n


# ----------------------------------------------------------------------------- sources


def _png_gray(image: np.ndarray) -> tuple[str, bytes]:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return "png", buf.getvalue()


def _fashion_mnist(path: str, max_images: int) -> _Source:
    arrays = load_fashion_mnist(path)

    def side(part: str) -> _ImageSet:
        n = _limit(len(arrays[f"{part}_images"]), max_images)
        images, labels = arrays[f"{part}_images"][:n], arrays[f"{part}_labels"][:n].astype(np.int64)
        cache: dict[int, tuple[str, bytes]] = {}  # the train subset re-uses the database's encodings

        def encode_many(indices: np.ndarray) -> Iterator[tuple[str, bytes]]:
            for i in indices:
                i = int(i)
                if i not in cache:
                    cache[i] = _png_gray(images[i])
                yield cache[i]

        return _ImageSet(_keys(part, range(n), len(arrays[f"{part}_images"])), labels, encode_many)

    return _Source(list(FASHION_MNIST_CLASSES), FASHION_MNIST_SIZE, 1, side("train"), side("test"))


def _folder_side(
    images: imagefolder.ImageList,
    keys: list[str],
    positions: np.ndarray,
    in_chans: int,
    shorter_side: int,
    num_procs: int,
    max_pixels: int = imagefolder.DEFAULT_MAX_IMAGE_PIXELS,
) -> _ImageSet:
    paths = [str(images.root / images.files[p]) for p in positions]
    # (extension, bytes), or the reason (str) why an image is skipped: corrupt, empty or above the pixel cap
    encode = partial(
        imagefolder.encode_for_shard_or_reason, in_chans=in_chans, shorter_side=shorter_side, max_pixels=max_pixels
    )

    def encode_many(indices: np.ndarray) -> Iterator[tuple[str, bytes]]:
        todo = [paths[int(i)] for i in indices]
        if num_procs <= 1 or len(todo) < POOL_MIN_IMAGES:
            yield from map(encode, todo)
            return
        # fork, as DataLoader does: spawn would re-import the caller's main module in every child, and a script
        # without a __main__ guard would then re-enter write_shards and wait on the directory lock forever
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with multiprocessing.get_context(method).Pool(num_procs) as pool:
            yield from pool.imap(encode, todo, chunksize=16)

    return _ImageSet([keys[p] for p in positions], images.labels[positions], encode_many, paths)


def _image_folder(
    path: str,
    *,
    shorter_side: int,
    in_chans: int,
    holdout_fraction: float,
    seed: int,
    max_images: int,
    num_procs: int,
    max_pixels: int = imagefolder.DEFAULT_MAX_IMAGE_PIXELS,
) -> _Source:
    """train/ + val/ when both exist (keys 'train-N', 'val-N'); else one folder, split by the seed ('img-N')."""
    size = shorter_side
    root = Path(path)
    if imagefolder.has_train_val(root):
        classes, train = imagefolder.scan_class_folders(root / "train")
        _, val = imagefolder.scan_class_folders(root / "val", classes)
        n_tr, n_te = _limit(len(train.files), max_images), _limit(len(val.files), max_images)
        tr_keys, te_keys = (
            _keys("train", range(len(train.files)), len(train.files)),
            _keys("val", range(len(val.files)), len(val.files)),
        )
        return _Source(
            classes,
            size,
            in_chans,
            _folder_side(train, tr_keys, np.arange(n_tr), in_chans, size, num_procs, max_pixels),
            _folder_side(val, te_keys, np.arange(n_te), in_chans, size, num_procs, max_pixels),
        )
    classes, allimg = imagefolder.scan_class_folders(root)
    keys = _keys("img", range(len(allimg.files)), len(allimg.files))
    kept, held = splits.holdout_split(allimg.labels, holdout_fraction, seed)
    kept, held = kept[: _limit(len(kept), max_images)], held[: _limit(len(held), max_images)]
    return _Source(
        classes,
        size,
        in_chans,
        _folder_side(allimg, keys, kept, in_chans, size, num_procs, max_pixels),
        _folder_side(allimg, keys, held, in_chans, size, num_procs, max_pixels),
    )


# ----------------------------------------------------------------------------- writing


def shard_sizes(n: int, samples_per_shard: int, readers: int = 0) -> list[int]:
    """How many samples each shard of an n-sample split holds. readers = 0: samples_per_shard each, the rest in
    the last; readers > 0: max(ceil(n / samples_per_shard), min(readers, n)) shards of near-equal size."""
    if readers <= 0:
        return [min(samples_per_shard, n - start) for start in range(0, n, samples_per_shard)]
    k = max(math.ceil(n / samples_per_shard), min(readers, n))
    q, rem = divmod(n, k) if k else (0, 0)
    return [q + 1] * rem + [q] * (k - rem)


PROGRESS_NAME = "shards.progress.json"  # written shards' hashes while a run of write_shards is unfinished


def _shard_keys(uri: str) -> list[str]:
    """The sample keys of a written shard, in order (a resumed run re-lists a kept shard: some of its images may
    have been skipped when it was written)."""
    return [sample["__key__"] for sample in shard_samples(uri)]


def _plan(name: str, order: np.ndarray, samples_per_shard: int, readers: int) -> list[tuple[str, np.ndarray]]:
    """A split's shards: (file name, the side's indices it holds, in order)."""
    bounds = np.cumsum([0] + shard_sizes(len(order), samples_per_shard, readers))
    return [(f"{name}-{i:06d}.tar", order[a:b]) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def _split_info(
    name: str, images: _ImageSet, plan: list[tuple[str, np.ndarray]], keys: dict[str, list[str]], skipped: list[str]
) -> SplitInfo:
    """The manifest's record of a written split: its shards and the keys and labels they hold, in order."""
    if skipped:
        log.warning(
            "split %s: %d image(s) skipped (unreadable, empty or above data.max_image_pixels), first: %s",
            name,
            len(skipped),
            skipped[0],
        )
    label_of = {images.keys[int(j)]: int(images.labels[int(j)]) for _, part in plan for j in part}
    kept = [k for fname, _ in plan for k in keys[fname]]
    return SplitInfo(
        count=len(kept),
        shards=[fname for fname, _ in plan],
        shard_counts=[len(keys[fname]) for fname, _ in plan],
        keys=kept,
        labels=[label_of[k] for k in kept],
    )


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


def _write_serial(
    out: str, todo: list[tuple[str, str, np.ndarray]], sides: dict[str, _ImageSet], bar: tqdm, record
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


def _write_with_ray(
    out: str,
    todo: list[tuple[str, str, np.ndarray]],
    sides: dict[str, _ImageSet],
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


def _stored_params(
    source: str,
    *,
    seed: int,
    train_per_class: int,
    val_fraction: float,
    samples_per_shard: int,
    in_chans: int,
    shorter_side: int,
    holdout_fraction: float,
    max_images: int,
) -> dict:
    """The manifest's content parameters for a request, known before reading the source. The manifest's
    image_size is the stored shorter side: 28 for Fashion-MNIST, `shorter_side` for an ImageFolder (0: as the
    source's files are)."""
    image_size = shorter_side
    if source == "fashion_mnist":
        in_chans, image_size, holdout_fraction = 1, FASHION_MNIST_SIZE, 0.0  # stored as is; readers convert
    return dict(
        source=source,
        seed=seed,
        train_per_class=train_per_class,
        val_fraction=val_fraction,
        samples_per_shard=samples_per_shard,
        in_chans=in_chans,
        image_size=image_size,
        holdout_fraction=holdout_fraction,
        max_images=max_images,
    )


def _intact(out: str, name: str, sha256: str | None) -> bool:
    return (
        sha256 is not None
        and storage.is_file(storage.join(out, name))
        and storage.file_sha256(storage.join(out, name)) == sha256
    )


def verify_shards(manifest: Manifest, shards_dir: str | os.PathLike) -> list[str]:
    """Shard files that are missing or whose sha256 differs from the manifest's (empty: all good)."""
    return [name for name in manifest.shard_files() if not _intact(str(shards_dir), name, manifest.sha256.get(name))]


def _load_progress(out: str, wanted: dict) -> dict[str, str]:
    """Hashes of the shards an unfinished earlier run wrote with the same parameters, that are still there intact."""
    path = storage.join(out, PROGRESS_NAME)
    if not storage.is_file(path):
        return {}
    progress = json.loads(storage.read_bytes(path))
    if progress.get("params") != wanted:
        return {}
    kept = {n: h for n, h in progress.get("sha256", {}).items() if _intact(out, n, h)}
    log.info(
        "%s: resuming: %d of the earlier run's %d shard(s) are there intact",
        out,
        len(kept),
        len(progress.get("sha256", {})),
    )
    return kept


@contextlib.contextmanager
def _dir_lock(directory: str):
    """One writer per local shard directory (several ranks or jobs may call ensure_shards at once); an object
    store location has no lock: one writer at a time (jobs/make_shards.py)."""
    if not storage.is_local(directory):
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_shards(
    shards_dir: str | os.PathLike,
    source: str,
    source_path: str,
    *,
    seed: int = 0,
    train_per_class: int = 500,
    val_fraction: float = 0.5,
    samples_per_shard: int = 1000,
    in_chans: int = 1,
    shorter_side: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT,
    max_images: int = 0,
    readers: int = 0,
    num_procs: int = 1,
    progress: bool = True,
    max_image_pixels: int = imagefolder.DEFAULT_MAX_IMAGE_PIXELS,
    ray_address: str = "",
) -> Manifest:
    """Make (or verify and re-use) the four splits' shards and manifest.json in shards_dir: a local directory or
    an object store location (s3://bucket/prefix, gs://...), each shard uploaded as soon as it is written.

    A location whose manifest has other content parameters is refused (ShardsMismatchError); one with the
    same parameters and intact shards is returned as is. Otherwise the shards are written, except those that an
    unfinished earlier run left there intact (shards.progress.json records their sha256): a re-run resumes.
    shorter_side (0: keep the source's size and bytes), in_chans and max_image_pixels apply to ImageFolder sources
    (Fashion-MNIST is stored as 28x28 gray PNG); readers > 0: at least that many shards a split (module docstring);
    max_images > 0 keeps only the first max_images training and test images (tests, smoke runs).
    ray_address (ImageFolder only; "auto": the running cluster): one Ray task per shard across the cluster's CPUs,
    each reading its images by path (the folder must be at the same path on every node) and writing its shard to
    shards_dir; otherwise this process writes them, encoding with num_procs processes.
    """
    if shorter_side < 0 or readers < 0:
        raise ValueError(f"shorter_side={shorter_side}, readers={readers}: must be >= 0 (0: keep / no minimum)")
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: shards can be made from {', '.join(SOURCES)}")
    if ray_address and source != "imagefolder":
        raise ValueError(f"data.source={source!r}: --ray writes ImageFolder shards (IDX sources are small)")
    out = str(shards_dir) if not storage.is_local(str(shards_dir)) else os.path.abspath(shards_dir)
    wanted = _stored_params(
        source,
        seed=seed,
        train_per_class=train_per_class,
        val_fraction=val_fraction,
        samples_per_shard=samples_per_shard,
        in_chans=in_chans,
        shorter_side=shorter_side,
        holdout_fraction=holdout_fraction,
        max_images=max_images,
    )
    with _dir_lock(out):
        done: dict[str, str] = {}
        if storage.is_file(manifest_path(out)):
            existing = load_manifest(out)
            check_same_params(existing, wanted, out)
            check_same_layout(existing, samples_per_shard, readers, out)
            bad = verify_shards(existing, out)
            if not bad:
                log.info("%s: shards verified (%d files), re-using them", out, len(existing.shard_files()))
                return existing
            log.warning("%s: %d shard(s) missing or changed (first: %s); rewriting those", out, len(bad), bad[0])
            done = {n: h for n, h in existing.sha256.items() if n not in bad}
        else:
            done = _load_progress(out, {**wanted, "readers": readers})  # readers moves the shard boundaries
        storage.makedirs(out)
        journal = {"params": {**wanted, "readers": readers}, "sha256": dict(done)}  # what PROGRESS_NAME holds

        def on_shard(fname: str, sha: str) -> None:  # record each finished shard: a killed run resumes after it
            journal["sha256"][fname] = sha
            storage.write_bytes(storage.join(out, PROGRESS_NAME), json.dumps(journal).encode())

        if source == "fashion_mnist":
            src = _fashion_mnist(source_path, max_images)
        else:
            src = _image_folder(
                source_path,
                shorter_side=shorter_side,
                in_chans=in_chans,
                holdout_fraction=holdout_fraction,
                seed=seed,
                max_images=max_images,
                num_procs=num_procs,
                max_pixels=max_image_pixels,
            )
        orders = splits.make_splits(
            src.train.labels,
            len(src.test.labels),
            train_per_class=train_per_class,
            val_fraction=val_fraction,
            seed=seed,
        )
        sides = {"train": src.train, "database": src.train, "val_query": src.test, "test_query": src.test}
        plans = {name: _plan(name, order, samples_per_shard, readers) for name, order in orders.items()}
        keys: dict[str, list[str]] = {}  # shard -> keys written in it
        skipped: dict[str, list[str]] = {name: [] for name in plans}  # split -> reasons of images skipped
        todo = []
        with tqdm(
            total=sum(len(o) for o in orders.values()),
            desc=f"shards -> {out}",
            unit="img",
            disable=not progress,
            mininterval=1.0,
        ) as bar:
            for name, plan in plans.items():
                for fname, part in plan:
                    if fname in done:  # an earlier run wrote it: re-list its keys (some images may be skipped)
                        keys[fname] = _shard_keys(storage.join(out, fname))
                        bar.update(len(part))
                    else:
                        todo.append((name, fname, part))

            def record(name: str, row: dict, images: int) -> None:
                keys[row["name"]] = row["keys"]
                for reason in row["skipped"][: max(0, 20 - len(skipped[name]))]:  # the first 20 of a split
                    log.warning("split %s: image skipped: %s", name, reason)
                skipped[name] += row["skipped"]
                on_shard(row["name"], row["sha256"])
                bar.update(images)

            if ray_address:
                _write_with_ray(out, todo, sides, bar, record, (in_chans, shorter_side, max_image_pixels), ray_address)
            else:
                _write_serial(out, todo, sides, bar, record)
        infos = {name: _split_info(name, sides[name], plans[name], keys, skipped[name]) for name in plans}
        manifest = Manifest(
            source=source,
            source_path=str(source_path),
            seed=seed,
            train_per_class=train_per_class,
            val_fraction=val_fraction,
            samples_per_shard=samples_per_shard,
            num_classes=len(src.classes),
            classes=list(src.classes),
            image_size=src.image_size,
            in_chans=src.in_chans,
            splits=infos,
            sha256={fname: journal["sha256"][fname] for plan in plans.values() for fname, _ in plan},
            holdout_fraction=wanted["holdout_fraction"],
            max_images=max_images,
        )
        save_manifest(manifest, out)
        if storage.is_file(storage.join(out, PROGRESS_NAME)):
            storage.remove(storage.join(out, PROGRESS_NAME))
        return manifest


def check_same_layout(existing: Manifest, samples_per_shard: int, readers: int, shards_dir) -> None:
    """Raise ShardsMismatchError when the directory's shards are cut for another number of readers."""
    for name, split in existing.splits.items():
        want = shard_sizes(split.count, samples_per_shard, readers)
        # skipped images (corrupt, empty, above the pixel cap) leave a split short of the count it was cut for: its
        # shard count then lies between what `readers` gives for the images kept and for twice as many
        most = len(shard_sizes(2 * split.count, samples_per_shard, readers))
        if split.shard_counts != want and not (
            len(want) <= len(split.shard_counts) <= most and max(split.shard_counts, default=0) <= samples_per_shard
        ):
            raise ShardsMismatchError(
                f"{shards_dir} holds {len(split.shard_counts)} {name} shards, asked for {len(want)} "
                f"(data.shard_readers={readers}): use another data.shards_dir or delete that one"
            )


def shard_params(d) -> dict:
    """write_shards' keyword arguments that come from the config's data section (d: brcd_dist.config.DataConfig)."""
    return dict(
        seed=d.split_seed,
        train_per_class=d.train_per_class,
        val_fraction=d.val_fraction,
        samples_per_shard=d.samples_per_shard,
        in_chans=d.in_chans,
        shorter_side=d.shard_shorter_side,
        readers=d.shard_readers,
        max_image_pixels=d.max_image_pixels,
        max_images=d.max_images,
    )


def _content_params(params: dict) -> dict:
    """Of shard_params, those the manifest records as its content (readers and the pixel cap are not)."""
    return {k: v for k, v in params.items() if k not in ("readers", "max_image_pixels")}


def ensure_shards(cfg) -> Manifest:
    """The shards a run reads (cfg: brcd_dist.config.Config): made when missing, verified when local.

    The manifest is read where the shards are: data.shards_url when set (s3://, gs://), else data.shards_dir.
    data.source == "shards": that manifest is used as is. A remote manifest has its parameters checked but the
    shard files are not hashed here (readers check each shard's sha256 as they stream it).
    """
    d = cfg.data
    where = manifest_location(d.shards_dir, d.shards_url)
    if d.source == "shards":
        return load_manifest(where)
    if d.shards_url and storage.is_file(manifest_path(where)):
        manifest = load_manifest(where)
        check_same_params(
            manifest,
            _stored_params(d.source, **_content_params(shard_params(d)), holdout_fraction=DEFAULT_HOLDOUT),
            where,
        )
        return manifest
    return write_shards(
        where,
        d.source,
        d.source_path,
        **shard_params(d),
        num_procs=os.cpu_count() or 1,
        progress=True,
    )


__all__ = ["write_shards", "ensure_shards", "verify_shards", "ShardsMismatchError", "SOURCES"]
