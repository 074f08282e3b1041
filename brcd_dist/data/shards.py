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

What is read comes from a source (data/sources/: one module each, found by name); how a shard is written is in
data/shard_writer.py: this process (encoding with a pool), or with `ray_address` one Ray task per shard across a
cluster's CPUs (jobs/make_shards.py --ray). Both write the same bytes, record each finished shard's sha256 in
shards.progress.json, and so resume the same way. Why not Ray Data (read_binary_files -> write_webdataset): its
writer names and fills files by blocks, so the seeded split's sample -> shard -> position layout, the shard names
and the per-shard counts that the epoch plan reads would have to be rebuilt after the fact, and it has no
per-file resume (a failed job rewrites everything).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from brcd_dist import storage
from brcd_dist.data import imagefolder, sources, splits
from brcd_dist.data.manifest import (
    Manifest,
    ShardsMismatchError,
    SplitInfo,
    check_same_params,
    load_manifest,
    manifest_location,
    manifest_path,
    save_manifest,
)
from brcd_dist.data.shard_writer import write_serial, write_with_ray
from brcd_dist.data.sources import ImageSet
from brcd_dist.data.tar_samples import shard_samples

log = logging.getLogger(__name__)

DEFAULT_HOLDOUT = splits.DEFAULT_HOLDOUT  # (in splits.py: config validation reads it without torch)


@dataclass(frozen=True)
class ShardSpec:
    """What shards to make: the source, the split protocol, the layout and how images are stored."""

    source: str
    source_path: str
    seed: int = 0
    train_per_class: int = 500
    val_fraction: float = 0.5
    samples_per_shard: int = 1000
    in_chans: int = 1
    shorter_side: int = 0  # 0: keep the source's size and bytes
    holdout_fraction: float = DEFAULT_HOLDOUT
    max_images: int = 0  # > 0: only the first max_images training and test images (tests, smoke runs)
    readers: int = 0  # > 0: at least that many shards a split (ranks x loader workers)
    max_image_pixels: int = imagefolder.DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def of_data(cls, d) -> "ShardSpec":
        """The spec of the config's data section (brcd_dist.config.DataConfig)."""
        return cls(
            source=d.source,
            source_path=d.source_path,
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

    def stored(self) -> dict:
        """The manifest's content parameters, known before reading the source (the layout's `readers` and the
        pixel cap are not content). image_size is the stored shorter side; a source may fix some (FIXED)."""
        params = {k: v for k, v in asdict(self).items() if k not in ("source_path", "readers", "max_image_pixels")}
        params["image_size"] = params.pop("shorter_side")
        return {**params, **sources.get(self.source).FIXED}


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
    name: str, images: ImageSet, plan: list[tuple[str, np.ndarray]], keys: dict[str, list[str]], skipped: list[str]
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
    num_procs: int = 1,
    progress: bool = True,
    ray_address: str = "",
    **spec,
) -> Manifest:
    """Make (or verify and re-use) the four splits' shards and manifest.json in shards_dir: a local directory or
    an object store location (s3://bucket/prefix, gs://...), each shard uploaded as soon as it is written.
    `spec`: ShardSpec's other fields. See `write`."""
    return write(ShardSpec(source, str(source_path), **spec), shards_dir, num_procs, progress, ray_address)


def write(
    spec: ShardSpec, shards_dir: str | os.PathLike, num_procs: int = 1, progress: bool = True, ray_address: str = ""
) -> Manifest:
    """A location whose manifest has other content parameters is refused (ShardsMismatchError); one with the same
    parameters and intact shards is returned as is. Otherwise the shards are written, except those that an
    unfinished earlier run left there intact (shards.progress.json records their sha256): a re-run resumes.
    ray_address ("auto": the running cluster; sources with RAY_TASKS): one Ray task per shard across the
    cluster's CPUs, each reading its images by path and writing its shard to shards_dir; otherwise this process
    writes them, encoding with num_procs processes."""
    if spec.shorter_side < 0 or spec.readers < 0:
        raise ValueError(
            f"shorter_side={spec.shorter_side}, readers={spec.readers}: must be >= 0 (0: keep / no minimum)"
        )
    module = sources.get(spec.source)
    if ray_address and not module.RAY_TASKS:
        raise ValueError(f"data.source={spec.source!r}: --ray is for {_ray_sources()} (images a task reads by path)")
    out = str(shards_dir) if not storage.is_local(str(shards_dir)) else os.path.abspath(shards_dir)
    with _dir_lock(out):
        done = _reusable(spec, out)
        if isinstance(done, Manifest):
            return done
        storage.makedirs(out)
        journal = {"params": {**spec.stored(), "readers": spec.readers}, "sha256": dict(done)}
        src = module.open(spec, num_procs)
        orders = splits.make_splits(
            src.train.labels,
            len(src.test.labels),
            train_per_class=spec.train_per_class,
            val_fraction=spec.val_fraction,
            seed=spec.seed,
        )
        sides = {"train": src.train, "database": src.train, "val_query": src.test, "test_query": src.test}
        plans = {name: _plan(name, order, spec.samples_per_shard, spec.readers) for name, order in orders.items()}
        keys, skipped = _write_plans(spec, out, sides, plans, journal, progress, ray_address)
        manifest = Manifest(
            source=spec.source,
            source_path=spec.source_path,
            seed=spec.seed,
            train_per_class=spec.train_per_class,
            val_fraction=spec.val_fraction,
            samples_per_shard=spec.samples_per_shard,
            num_classes=len(src.classes),
            classes=list(src.classes),
            image_size=src.image_size,
            in_chans=src.in_chans,
            splits={name: _split_info(name, sides[name], plans[name], keys, skipped[name]) for name in plans},
            sha256={fname: journal["sha256"][fname] for plan in plans.values() for fname, _ in plan},
            holdout_fraction=spec.stored()["holdout_fraction"],
            max_images=spec.max_images,
        )
        save_manifest(manifest, out)
        if storage.is_file(storage.join(out, PROGRESS_NAME)):
            storage.remove(storage.join(out, PROGRESS_NAME))
        return manifest


def _ray_sources() -> str:
    return ", ".join(n for n in sources.names() if sources.get(n).RAY_TASKS)


def _reusable(spec: ShardSpec, out: str) -> Manifest | dict[str, str]:
    """The manifest at `out` when its shards are there intact (refused when made with other parameters), else
    {shard: sha256} of the shards that an earlier run left there intact (kept, not rewritten)."""
    if not storage.is_file(manifest_path(out)):
        return _load_progress(out, {**spec.stored(), "readers": spec.readers})  # readers moves shard boundaries
    existing = load_manifest(out)
    check_same_params(existing, spec.stored(), out)
    check_same_layout(existing, spec.samples_per_shard, spec.readers, out)
    bad = verify_shards(existing, out)
    if not bad:
        log.info("%s: shards verified (%d files), re-using them", out, len(existing.shard_files()))
        return existing
    log.warning("%s: %d shard(s) missing or changed (first: %s); rewriting those", out, len(bad), bad[0])
    return {n: h for n, h in existing.sha256.items() if n not in bad}


def _write_plans(
    spec: ShardSpec,
    out: str,
    sides: dict[str, ImageSet],
    plans: dict[str, list],
    journal: dict,
    progress: bool,
    ray_address: str,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Write the shards of `plans` that the journal does not hold already; returns (shard -> keys written in it,
    split -> reasons of the images skipped). Each finished shard goes into the journal (PROGRESS_NAME) at once,
    so that a killed run resumes after it."""
    keys: dict[str, list[str]] = {}
    skipped: dict[str, list[str]] = {name: [] for name in plans}
    todo = []
    total = sum(len(part) for plan in plans.values() for _, part in plan)
    with tqdm(total=total, desc=f"shards -> {out}", unit="img", disable=not progress, mininterval=1.0) as bar:
        for name, plan in plans.items():
            for fname, part in plan:
                if fname in journal["sha256"]:  # an earlier run wrote it: re-list its keys (some images may be skipped)
                    keys[fname] = _shard_keys(storage.join(out, fname))
                    bar.update(len(part))
                else:
                    todo.append((name, fname, part))

        def record(name: str, row: dict, images: int) -> None:
            keys[row["name"]] = row["keys"]
            for reason in row["skipped"][: max(0, 20 - len(skipped[name]))]:  # the first 20 of a split
                log.warning("split %s: image skipped: %s", name, reason)
            skipped[name] += row["skipped"]
            journal["sha256"][row["name"]] = row["sha256"]
            storage.write_bytes(storage.join(out, PROGRESS_NAME), json.dumps(journal).encode())
            bar.update(images)

        if ray_address:
            encoding = (spec.in_chans, spec.shorter_side, spec.max_image_pixels)
            write_with_ray(out, todo, sides, bar, record, encoding, ray_address)
        else:
            write_serial(out, todo, sides, bar, record)
    return keys, skipped


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
        check_same_params(manifest, ShardSpec.of_data(d).stored(), where)
        return manifest
    return write(ShardSpec.of_data(d), where, num_procs=os.cpu_count() or 1, progress=True)


__all__ = ["ShardSpec", "write", "write_shards", "ensure_shards", "verify_shards", "ShardsMismatchError"]
