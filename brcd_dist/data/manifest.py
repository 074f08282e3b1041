"""manifest.json: what a shard directory holds (the seeded split, per-shard counts, keys, labels, hashes).

Readers plan every epoch from it without opening a shard: per-shard counts give each rank its step count
(reading.py), keys and labels let the evaluation align codes with labels (DESIGN §1, §3). It lives with the
shards, wherever they are (a local directory, s3://, gs://: brcd_dist.storage), so a worker needs nothing local.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from brcd_dist import storage

SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # what write_shards names them: SPLIT-NNNNNN.tar

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "database", "val_query", "test_query")
# Parameters that decide the contents of the shards: a directory made with other values is refused, never mixed.
CONTENT_PARAMS = (
    "source",
    "seed",
    "train_per_class",
    "val_fraction",
    "samples_per_shard",
    "in_chans",
    "image_size",
    "holdout_fraction",
    "max_images",
)


class ShardsMismatchError(ValueError):
    """The shard directory holds shards made with other parameters; the message is one line."""


@dataclass
class SplitInfo:
    count: int
    shards: list[str]  # file names, relative to the shard directory or shards_url
    shard_counts: list[int]
    keys: list[str]  # in stored order: shard 0's samples first
    labels: list[int]


@dataclass
class Manifest:
    source: str
    source_path: str
    seed: int
    train_per_class: int
    val_fraction: float
    samples_per_shard: int
    num_classes: int
    classes: list[str]
    image_size: int  # side of the stored images (shorter side for ImageFolder); readers resize to their own size
    in_chans: int
    splits: dict[str, SplitInfo]
    sha256: dict[str, str]  # shard file name -> hex digest
    holdout_fraction: float = 0.0  # ImageFolder without train/ and val/: share of each class held out as queries
    max_images: int = 0  # > 0: only the first max_images training and test images were used (tests, smoke runs)
    format: int = FORMAT_VERSION
    shards_dir: str = field(default="", compare=False)  # where it was loaded from; not stored
    _sha256: str = field(default="", compare=False, repr=False)  # of the file as read or written

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("shards_dir")
        d.pop("_sha256")
        return json.dumps(d, indent=1)

    def digest(self) -> str:
        """sha256 of the manifest file: names the exact data a run used (logged with the run)."""
        return self._sha256 or hashlib.sha256(self.to_json().encode()).hexdigest()

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in CONTENT_PARAMS}

    def shard_files(self) -> list[str]:
        return [name for split in self.splits.values() for name in split.shards]


def manifest_path(shards_dir: str | os.PathLike) -> str:
    return storage.join(str(shards_dir), MANIFEST_NAME)


def manifest_location(shards_dir: str, shards_url: str = "") -> str:
    """Where a run's manifest is: with the shards at shards_url when that is a location (not a pipe: template),
    else in the local shards_dir."""
    if shards_url and "{shard}" not in shards_url and storage.scheme(shards_url) not in ("pipe", "http", "https"):
        return shards_url
    return str(shards_dir)


def load_manifest(shards_dir: str | os.PathLike) -> Manifest:
    """The manifest in a shard location (local directory, s3://, gs://)."""
    path = manifest_path(shards_dir)
    try:
        raw = storage.read_bytes(path)
    except (FileNotFoundError, storage.UnreadableError) as err:
        raise FileNotFoundError(f"{path}: no shard manifest (make shards with jobs/make_shards.py)") from err
    d = json.loads(raw)
    if d.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: manifest format {d.get('format')!r}, this code reads {FORMAT_VERSION}")
    d["splits"] = {name: SplitInfo(**s) for name, s in d["splits"].items()}
    # its digest, not its bytes, is kept: the file holds every key (40 MB at ImageNet-1k) and so does `d`
    return Manifest(**d, shards_dir=str(shards_dir), _sha256=hashlib.sha256(raw).hexdigest())


def save_manifest(manifest: Manifest, shards_dir: str | os.PathLike) -> None:
    """Write atomically (tmp + rename, or one upload): a crash never leaves half a manifest beside the shards."""
    text = manifest.to_json().encode()
    storage.write_bytes(manifest_path(shards_dir), text)
    manifest._sha256 = hashlib.sha256(text).hexdigest()
    manifest.shards_dir = str(shards_dir)


def check_same_params(existing: Manifest, wanted: dict[str, Any], shards_dir: str | os.PathLike) -> None:
    """Raise ShardsMismatchError naming the first parameter that differs."""
    for k in CONTENT_PARAMS:
        if k in wanted and getattr(existing, k) != wanted[k]:
            raise ShardsMismatchError(
                f"{shards_dir} holds shards made with {k}={getattr(existing, k)!r}, asked for {k}={wanted[k]!r}: "
                "use another data.shards_dir / data.shards_url or delete that one"
            )


def file_sha256(path: str | os.PathLike) -> str:
    return storage.file_sha256(str(path))


def shard_url(name: str, shards_dir: str, shards_url: str = "") -> str:
    """Where a reader opens shard `name`: shards_url as base when set, else the shard directory.

    A location (local, s3://, gs://, http(s)://) gets the name joined on; a base holding '{shard}' (e.g.
    'pipe:gsutil cat gs://b/{shard}') gets the name put in its place.
    """
    if not SHARD_NAME.fullmatch(name):  # a crafted manifest: no path, argument or shell syntax reaches a reader
        raise ValueError(f"shard name {name!r}: allowed: letters, digits, '.', '_', '-', not first '.' or '-'")
    base = shards_url or shards_dir
    if "{shard}" in base:
        return base.replace("{shard}", name)
    if base.startswith("pipe:"):
        raise ValueError(f"data.shards_url={base!r}: a pipe: URL needs '{{shard}}' where the file name goes")
    return storage.join(base, name)
