"""Encoding an image collection on the cluster with Ray Data: one `map_batches` over an actor pool sized to the
cluster's GPUs (one actor a GPU) or CPUs (one actor a CPU), each actor holding the hash model once.

    images = image_source("data/fashion_mnist", split="database")   # shard directory, or an ImageFolder root
    encoded = encode_images(model, images)                          # -> Encoded(codes, keys, labels), by key

The input rows are units of reading: one shard of the project's WebDataset shards (the actor streams it, decodes
and encodes in batches of `batch_size`), or a batch of image files of an ImageFolder. Reading is therefore done
where the encoding is, and nothing but codes (8 bytes a 64-bit image), keys and labels comes back to the driver.

This pass must see every key (DESIGN §5): an undecodable sample or a shard that yields fewer samples than the
manifest says fails the pass with the shard's name, and the driver checks the count and uniqueness of the keys.

Used by jobs/index.py and jobs/evaluate.py (and bench/serving.py). Ray lives here and in jobs/, not in the cores.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brcd_dist import storage
from brcd_dist.codes import pack_codes
from brcd_dist.data.augment import eval_batch
from brcd_dist.data.imagefolder import DEFAULT_MAX_IMAGE_PIXELS, check_pixels, has_train_val, scan_class_folders
from brcd_dist.data.manifest import load_manifest, manifest_path, shard_url
from brcd_dist.data.tar_samples import DEFAULT_MAX_MEMBER_BYTES, IMAGE_EXTENSIONS, shard_samples
from brcd_dist.models import HashModel

DEFAULT_BATCH_SIZE = 256
FOLDER_FILES_PER_ROW_BATCH = 256


@dataclass
class ImageSource:
    """What to encode: `rows` are units of reading (a shard {"url", "count", "sha256"} or a file {"path", "key",
    "label"})."""

    kind: str  # "shards" or "folder"
    rows: list[dict]
    count: int  # images expected
    description: str


@dataclass
class Encoded:
    codes: np.ndarray  # uint8 (N, L/8), codes.pack_codes order
    keys: np.ndarray  # str (N,), sorted: the pipeline's order, so ties break alike everywhere
    labels: np.ndarray  # int64 (N,)


def image_source(location: str, split: str = "database", shards_url: str = "") -> ImageSource:
    """A shard directory (it has manifest.json: the split's shards) or an ImageFolder root (CLASS/IMAGE, or
    train/ and val/ above them: `split` 'train' or 'val' picks one, else both)."""
    if storage.is_file(manifest_path(location)):
        manifest = load_manifest(location)
        if split not in manifest.splits:
            raise ValueError(f"split {split!r}: {location} has {', '.join(manifest.splits)}")
        info = manifest.splits[split]
        rows = [
            {
                "url": shard_url(name, manifest.shards_dir, shards_url),
                "count": int(n),
                "sha256": manifest.sha256.get(name, ""),
            }
            for name, n in zip(info.shards, info.shard_counts)
        ]
        return ImageSource("shards", rows, info.count, f"{location} split {split} ({len(rows)} shards)")
    root = Path(location)
    if not root.is_dir():
        raise ValueError(f"--images {location!r}: neither a shard directory (manifest.json) nor an ImageFolder root")
    roots = [root]
    if has_train_val(root):
        roots = [root / split] if split in ("train", "val") else [root / "train", root / "val"]
    classes, rows = None, []
    for r in roots:
        classes, images = scan_class_folders(r, classes)
        rows += [
            {"path": str((r / f).resolve()), "key": str((r / f).relative_to(root)), "label": int(y)}
            for f, y in zip(images.files, images.labels)
        ]
    return ImageSource("folder", rows, len(rows), f"ImageFolder {location} ({len(classes)} classes)")


# ----------------------------------------------------------------------------- the actor


def _shard_samples(url: str, sha256: str | None, max_member_bytes: int):
    """(key, label, image bytes) of one shard, in stored order, through the one tar reader (data/tar_samples.py:
    the member cap, the shard's sha256); a refused or incomplete sample fails the pass (it must be whole)."""
    for s in shard_samples(url, max_member_bytes, sha256):
        key = s["__key__"]
        if "__refused__" in s:
            raise ValueError(f"{url}: sample {key}: {'; '.join(s['__refused__'])}")
        image = next((s[e] for e in IMAGE_EXTENSIONS if e in s), None)
        if image is None or "cls" not in s:
            raise ValueError(f"{url}: sample {key} has no {'image' if image is None else 'cls'}")
        yield key, int(s["cls"]), image


class Encoder:
    """A Ray Data actor: model on its device, batches of images in, packed codes out."""

    def __init__(self, model_ref, batch_size: int, threads: int, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        import ray

        model = model_ref[0] if isinstance(model_ref[0], HashModel) else ray.get(model_ref[0])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_member_bytes = max_member_bytes
        self.mode = "L" if self.model.in_chans == 1 else "RGB"

    def _encode(self, keys: list, labels: list, blobs: list, where: str) -> dict:
        images = []
        for key, blob in zip(keys, blobs):
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    check_pixels(im, DEFAULT_MAX_IMAGE_PIXELS, str(key))  # a decompression bomb: refused unread
                    images.append(im.convert(self.mode))
            except Exception as exn:  # noqa: BLE001 - any decoder error: name the sample, fail the pass
                raise ValueError(f"{where}: cannot decode {key}: {type(exn).__name__}: {exn}") from None
        x = eval_batch(images, self.model.img_size, self.model.in_chans).to(self.device)
        return {
            "key": np.asarray(keys, dtype=object),
            "label": np.asarray(labels, dtype=np.int64),
            "code": pack_codes(self.model.encode(x)),
        }

    def __call__(self, rows: dict):
        if "url" in rows:  # one shard a call: stream it in batches
            for url, count, sha in zip(rows["url"], rows["count"], rows["sha256"]):
                keys, labels, blobs, seen = [], [], [], 0
                for key, label, blob in _shard_samples(str(url), str(sha) or None, self.max_member_bytes):
                    keys.append(key), labels.append(label), blobs.append(blob)
                    if len(keys) == self.batch_size:
                        seen += len(keys)
                        yield self._encode(keys, labels, blobs, str(url))
                        keys, labels, blobs = [], [], []
                if keys:
                    seen += len(keys)
                    yield self._encode(keys, labels, blobs, str(url))
                if seen != int(count):
                    raise RuntimeError(
                        f"{url}: {seen} samples read, the manifest says {int(count)} "
                        "(truncated or damaged shard): this pass must see every key"
                    )
        else:  # image files
            blobs = [Path(p).read_bytes() for p in rows["path"]]
            yield self._encode(list(rows["key"]), list(rows["label"]), blobs, "ImageFolder")


# ----------------------------------------------------------------------------- the driver


def actor_pool(resources: dict | None = None) -> tuple[int, float, float]:
    """(actors, CPUs an actor, GPUs an actor): one actor a GPU when the cluster has GPUs, else one a CPU."""
    import ray

    res = resources if resources is not None else ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    if gpus:
        return gpus, max(1.0, float(cpus // gpus) - 1.0) if cpus > gpus else 1.0, 1.0
    return max(1, cpus), 1.0, 0.0


def encode_images(
    model: HashModel,
    source: ImageSource,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    actors: int | None = None,
    progress: bool = False,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Encoded:
    """Encode every image of `source` on the attached Ray cluster (ray.init first); codes sorted by key."""
    import ray
    import ray.data

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if not source.rows:
        raise ValueError(f"{source.description}: no images")
    n_actors, cpus, gpus = actor_pool()
    if actors is not None:
        if actors < 1:
            raise ValueError(f"actors={actors}: must be >= 1")
        n_actors = actors
    n_actors = min(n_actors, len(source.rows) if source.kind == "shards" else n_actors)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    rows_per_call = 1 if source.kind == "shards" else FOLDER_FILES_PER_ROW_BATCH
    ds = ray.data.from_items(source.rows, override_num_blocks=min(len(source.rows), 4 * n_actors * 8))
    model_ref = [ray.put(model.cpu().eval())]  # once into the object store, not once an actor
    ds = ds.map_batches(
        Encoder,
        batch_size=rows_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        fn_constructor_kwargs={
            "model_ref": model_ref,
            "batch_size": batch_size,
            "threads": int(cpus),
            "max_member_bytes": max_member_bytes,
        },
        num_cpus=cpus,
        num_gpus=gpus,
    )
    codes, keys, labels = [], [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        codes.append(batch["code"])
        keys.append(batch["key"])
        labels.append(batch["label"])
    codes = np.concatenate(codes).astype(np.uint8) if codes else np.zeros((0, model.bits // 8), np.uint8)
    keys = np.concatenate(keys).astype(str) if keys else np.zeros((0,), str)
    labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros((0,), np.int64)
    if len(keys) != source.count or len(np.unique(keys)) != len(keys):
        raise RuntimeError(
            f"{source.description}: encoded {len(keys)} images ({len(np.unique(keys))} distinct "
            f"keys), expected {source.count}: this pass must see every key exactly once"
        )
    order = np.argsort(keys, kind="stable")
    return Encoded(codes[order], keys[order], labels[order])
