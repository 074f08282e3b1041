"""ImageFolder shards written in parallel by Ray tasks across a cluster's CPUs, resumable shard by shard.

Same shards and manifest as shards.write_shards (same split, keys, order, shard sizes, bytes and sha256): the
driver scans the folder and cuts every split into shards; each shard is one Ray task (one CPU) that reads its
images, encodes them (imagefolder.encode_for_shard: JPEG bytes copied, or resized once; a corrupt, empty or
over-the-pixel-cap image is skipped, counted and named, as by the serial writer), writes the tar under a
temporary name, renames it and returns its sha256 and kept keys. The driver records every finished shard in
`.progress.jsonl` beside the shards; a re-run with the same parameters skips the shards recorded there whose file
is present, so a crash or a lost node costs only the shards in flight. manifest.json is written last.

Why not Ray Data (read_binary_files -> write_webdataset): its writer names and fills files by blocks, so the
seeded split's sample -> shard -> position layout, the `{split}-{i:06d}.tar` names and the per-shard counts that
the epoch plan reads would have to be rebuilt after the fact; it has no per-file resume (a failed job rewrites
everything); and it would still need a pass to hash every file. A task per shard keeps all of that in 100 lines.
Workers read the source by path, so the folder must be visible at the same path on every node (a shared
filesystem). The shards go to a local (or shared) directory only: an object store location (data.shards_url)
is refused with one line; the serial writer uploads there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from brcd_dist import storage
from brcd_dist.data import imagefolder, splits
from brcd_dist.data.manifest import (
    Manifest,
    SplitInfo,
    check_same_params,
    file_sha256,
    load_manifest,
    manifest_path,
    save_manifest,
)
from brcd_dist.data.shards import (
    DEFAULT_HOLDOUT,
    _dir_lock,
    _image_folder,
    _stored_params,
    check_same_layout,
    shard_sizes,
    verify_shards,
)

log = logging.getLogger(__name__)

PROGRESS_NAME = ".progress.jsonl"


def write_one_shard(
    out_dir: str,
    fname: str,
    samples: list[tuple[str, str, int]],
    in_chans: int,
    shorter_side: int,
    max_pixels: int = imagefolder.DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """One shard from [(key, image path, label)] in order: written atomically; returns name, count, sha256, the
    keys written and the reasons of the images skipped (corrupt, empty, above the pixel cap)."""
    out = Path(out_dir)
    tmp = out / f"{fname}.{os.getpid()}.tmp"
    keys, skipped = [], []
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        for key, path, label in samples:
            item = imagefolder.encode_for_shard_or_reason(path, in_chans, shorter_side, max_pixels)
            if isinstance(item, str):
                skipped.append(item)
                continue
            ext, data = item
            sink.write({"__key__": key, ext: data, "cls": str(int(label)).encode()})
            keys.append(key)
    os.replace(tmp, out / fname)
    return {"name": fname, "count": len(keys), "sha256": file_sha256(out / fname), "keys": keys, "skipped": skipped}


def _load_progress(out: Path, params: dict) -> dict[str, dict]:
    """Shards finished by an earlier run with the same parameters (first line: the parameters)."""
    path = out / PROGRESS_NAME
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines or json.loads(lines[0]) != params:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            break  # a line cut by a crash: what follows it is not trusted
        done[row["name"]] = row
    return done


def write_shards_parallel(
    shards_dir: str | os.PathLike,
    source_path: str,
    *,
    seed: int = 0,
    train_per_class: int = 500,
    val_fraction: float = 0.5,
    samples_per_shard: int = 1000,
    in_chans: int = 3,
    shorter_side: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT,
    max_images: int = 0,
    readers: int = 0,
    max_in_flight: int = 0,
    progress: bool = True,
    max_image_pixels: int = imagefolder.DEFAULT_MAX_IMAGE_PIXELS,
) -> Manifest:
    """write_shards for an ImageFolder, one Ray task per shard on the running Ray cluster (ray.init first)."""
    if not storage.is_local(str(shards_dir)):
        raise ValueError(
            f"{shards_dir}: --ray writes shards to a local or shared directory only; "
            "for an object store run jobs/make_shards.py without --ray"
        )
    import ray

    out = Path(shards_dir).absolute()
    wanted = _stored_params(
        "imagefolder",
        seed=seed,
        train_per_class=train_per_class,
        val_fraction=val_fraction,
        samples_per_shard=samples_per_shard,
        in_chans=in_chans,
        shorter_side=shorter_side,
        holdout_fraction=holdout_fraction,
        max_images=max_images,
    )
    with _dir_lock(str(out)):
        if Path(manifest_path(out)).is_file():
            existing = load_manifest(out)
            check_same_params(existing, wanted, out)
            check_same_layout(existing, samples_per_shard, readers, out)
            if not verify_shards(existing, out):
                return existing
        src = _image_folder(
            source_path,
            shorter_side=shorter_side,
            in_chans=in_chans,
            holdout_fraction=holdout_fraction,
            seed=seed,
            max_images=max_images,
            num_procs=1,
        )
        orders = splits.make_splits(
            src.train.labels,
            len(src.test.labels),
            train_per_class=train_per_class,
            val_fraction=val_fraction,
            seed=seed,
        )
        sides = {"train": src.train, "database": src.train, "val_query": src.test, "test_query": src.test}
        jobs: dict[str, list[tuple[str, str, int]]] = {}
        layout: dict[str, list[str]] = {}
        for name, order in orders.items():
            side, start = sides[name], 0
            layout[name] = []
            for size in shard_sizes(len(order), samples_per_shard, readers):
                fname = f"{name}-{len(layout[name]):06d}.tar"
                layout[name].append(fname)
                jobs[fname] = [
                    (side.keys[int(i)], side.paths[int(i)], int(side.labels[int(i)]))
                    for i in order[start : start + size]
                ]
                start += size
        params = {**wanted, "readers": readers}
        done = {k: v for k, v in _load_progress(out, params).items() if (out / k).is_file() and "keys" in v}
        if not done:
            (out / PROGRESS_NAME).write_text(json.dumps(params) + "\n")
        todo = [f for f in jobs if f not in done]
        log.info("%s: %d shards, %d done earlier, %d to write", out, len(jobs), len(done), len(todo))
        task = ray.remote(num_cpus=1)(write_one_shard)
        limit = max_in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: list = []
        with (
            open(out / PROGRESS_NAME, "a") as log_file,
            tqdm(
                total=sum(len(v) for v in jobs.values()),
                initial=sum(len(jobs[f]) for f in done),
                desc=f"shards -> {out}",
                unit="img",
                disable=not progress,
                mininterval=1.0,
            ) as bar,
        ):
            while todo or pending:
                while todo and len(pending) < limit:
                    fname = todo.pop(0)
                    pending.append(task.remote(str(out), fname, jobs[fname], in_chans, shorter_side, max_image_pixels))
                ready, pending = ray.wait(pending, num_returns=1)
                row = ray.get(ready[0])
                done[row["name"]] = row
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.update(len(jobs[row["name"]]))
        infos = {}
        for name, order in orders.items():
            side = sides[name]
            label_of = {side.keys[int(i)]: int(side.labels[int(i)]) for i in order}
            kept = [k for f in layout[name] for k in done[f]["keys"]]
            skipped = [r for f in layout[name] for r in done[f]["skipped"]]
            if skipped:
                log.warning(
                    "split %s: %d image(s) skipped (unreadable, empty or above data.max_image_pixels), first: %s",
                    name,
                    len(skipped),
                    skipped[0],
                )
            infos[name] = SplitInfo(
                count=len(kept),
                shards=layout[name],
                shard_counts=[done[f]["count"] for f in layout[name]],
                keys=kept,
                labels=[label_of[k] for k in kept],
            )
        manifest = Manifest(
            source="imagefolder",
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
            sha256={f: done[f]["sha256"] for f in jobs},
            holdout_fraction=wanted["holdout_fraction"],
            max_images=max_images,
        )
        save_manifest(manifest, out)
        return manifest


def ray_writer(address: str):
    """write_shards' signature, on the Ray cluster at `address` ('auto': the running one); ImageFolder only."""

    def write(shards_dir, source, source_path, *, num_procs: int = 1, **kw) -> Manifest:
        if source != "imagefolder":
            raise ValueError(f"data.source={source!r}: --ray writes ImageFolder shards (IDX sources are small)")
        if not storage.is_local(str(shards_dir)):
            raise ValueError(
                f"{shards_dir}: --ray writes shards to a local or shared directory only; "
                "for an object store run jobs/make_shards.py without --ray"
            )
        import ray

        if not ray.is_initialized():
            ray.init(address=address)
        return write_shards_parallel(shards_dir, source_path, **kw)

    return write
