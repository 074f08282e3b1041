"""Reading shards: two-view training batches and single-view eval batches, for N ranks x M loader workers.

Pipeline of one rank:
  epoch_plan (same on every rank) -> this rank's shard parts
  -> M DataLoader workers, each a webdataset pipeline over its share of the parts (nodesplitter: our rank
     selection, rank/world passed in, torch.distributed not needed; workersplitter: torch worker info)
  -> keep the part's sample positions, shuffle buffer (train), decode (JPEG, PNG, WebP), augment, collate into
     small chunks
  -> main process: cut the chunk stream into exactly the planned batches (train) or batches of B (eval).
Batching in the main process is what lets every rank yield exactly S batches whatever the workers' shares.

Tar members are read one at a time (tar_samples.py): a member above max_member_bytes (data.max_member_bytes) is
skipped unread and its sample counted and named as undecodable. Shards are streamed through brcd_dist.storage: a
dropped connection is retried and the shard re-opened at the byte already consumed, so the tar stream goes on at the
same sample; each shard's sha256 is checked against the manifest as it streams (a mismatch stops the pass with
ShardIntegrityError naming the shard). Damaged data that retrying cannot fix does not stop a training epoch: an
undecodable sample is skipped, a shard that stays unreadable after the retries (or ends early) is noticed against
the manifest's count; both are counted in `.stats` and logged. Passes that need every key (encoding for k-means,
evaluation) call `batches.raise_if_incomplete()`, which fails with one line naming the first damaged shard. If a
rank then runs short of samples for its S steps, it still yields S batches: what is left spreads over the remaining
steps when that gives each at least 2 samples; otherwise every remaining step gets what is left topped up to B with
samples of the last batch (repeats: counted in `.stats.padded_steps`).
"""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from brcd_dist import storage
from brcd_dist.data import tensor_augment
from brcd_dist.data.allocator import tune_for_augmentation
from brcd_dist.data.decoding import loader_payload, views_on_device
from brcd_dist.data.epoch_plan import ShardPart, batch_sizes, plan_epoch, rank_count, steps_per_epoch
from brcd_dist.data.imagefolder import DEFAULT_MAX_IMAGE_PIXELS, check_pixels
from brcd_dist.data.manifest import Manifest, shard_url
from brcd_dist.data.prefetch import prefetched
from brcd_dist.data.tar_samples import DEFAULT_MAX_MEMBER_BYTES, IMAGE_EXTENSIONS, tar_samples
from brcd_dist.redact import redact

log = logging.getLogger(__name__)

MAX_LOGGED_ERRORS = 20  # per pass; the counters count every skipped sample


@dataclass
class ReadStats:
    """Damage seen in one pass: read after the epoch as `batches.stats`."""

    bad_samples: int = 0  # undecodable image or label, or a sample missing its image or label
    missing_samples: int = 0  # samples the manifest promises that never arrived (truncated or unreadable shard)
    padded_steps: int = 0  # train: steps filled by repeating samples because the rank ran short
    errors: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.bad_samples + self.missing_samples

    def as_dict(self) -> dict[str, Any]:
        return {
            "bad_samples": self.bad_samples,
            "missing_samples": self.missing_samples,
            "padded_steps": self.padded_steps,
            "skipped": self.skipped,
            "errors": list(self.errors),
        }


def image_bytes(sample: dict) -> tuple[str, bytes]:
    """(extension, encoded image) of a shard sample, whichever readable extension it is stored under."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    raise ValueError(f"{sample.get('__key__')}: no image (extensions read: {', '.join(IMAGE_EXTENSIONS)})")


class IncompleteReadError(RuntimeError):
    """A pass that must see every key lost some (unreadable shard, undecodable sample); one line naming it."""


class ShardStream(IterableDataset):
    """One rank's samples as chunks of decoded, transformed tensors (runs inside DataLoader workers)."""

    def __init__(
        self,
        urls: list[str],
        parts: list[ShardPart],
        *,
        train: bool,
        image_size: int,
        in_chans: int,
        seed: int,
        epoch: int,
        rank: int,
        chunk_size: int,
        shuffle_buffer: int,
        augment_in_loader: bool = True,
        hashes: dict[str, str] | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        chunk_sizes: list[int] | None = None,
        only_keys: frozenset[str] | None = None,
    ):
        self.urls, self.parts, self.train = urls, parts, train
        # the planned batches cut into chunks (_chunk_plan): worker w of M makes chunks [w::M], so with the
        # DataLoader's round-robin a chunk is a whole batch or a whole part of one, never a slice of two (a copy)
        self.chunk_sizes = chunk_sizes
        self.only_keys = only_keys  # a capped evaluation set: other samples are passed over before decoding
        self.max_member_bytes = max_member_bytes  # larger tar members are skipped unread (0: no cap)
        self.augment_in_loader = augment_in_loader  # False: ship uint8 payloads, the device decodes (decoding.py)
        self.hashes = hashes or {}  # url -> sha256 from the manifest
        self.image_size, self.in_chans = image_size, in_chans
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.chunk_size, self.shuffle_buffer = chunk_size, shuffle_buffer

    # -- stages

    def _streams(self, parts: list[ShardPart]):
        """{"url", "stream"} of each part's shard, in order, through brcd_dist.storage (retry + byte-range
        re-open), the shard's sha256 checked when the tar reader is done with it."""
        for part in parts:
            url = self.urls[part.shard]
            stream = storage.open_read(url, sha256=self.hashes.get(url))
            try:
                yield {"url": url, "stream": stream}
                stream.raw.finish()  # the tar reader stops at the end-of-archive blocks: hash the rest too
            finally:
                stream.close()

    def _kept_samples(self, samples, parts: list[ShardPart], stats: ReadStats):
        """The parts' samples; a shard that delivers fewer than its part's count is reported."""
        by_url = {self.urls[p.shard]: p for p in parts}
        seen: dict[str, int] = {}
        for sample in samples:
            url = sample.get("__url__")
            if url in by_url:
                seen[url] = seen.get(url, 0) + 1
                if self.only_keys is None or sample.get("__key__") in self.only_keys:
                    yield sample
        for u, part in by_url.items():
            short = part.count - seen.get(u, 0)
            if short > 0:
                stats.missing_samples += short
                stats.errors.append(f"{u}: {short} of {part.count} samples missing (truncated or unreadable shard)")

    def _shuffled(self, samples, rng: random.Random):
        buf: list = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, sample) -> tuple[str, int, torch.Tensor]:
        key = sample["__key__"]
        if "__refused__" in sample:
            raise ValueError("; ".join(sample["__refused__"]))
        ext, data = image_bytes(sample)
        if "cls" not in sample:
            raise ValueError(f"{key}: missing cls")
        label = int(sample["cls"])
        with Image.open(io.BytesIO(data)) as image:  # the header only: a decompression bomb is refused unread
            check_pixels(image, DEFAULT_MAX_IMAGE_PIXELS, f"{key}")
        return key, label, loader_payload(data, ext, self.in_chans, decode_later=not self.augment_in_loader)

    def _chunk(self, items: list, stats: ReadStats, sent: dict[str, int]) -> dict[str, Any]:
        """Transform and collate items (key, label, image); carry the damage counted since the previous
        chunk (`sent`: the counts reported so far)."""
        keys = [k for k, _, _ in items]
        out: dict[str, Any] = {
            "key": keys,
            "label": torch.tensor([y for _, y, _ in items], dtype=torch.long),
            "bad_samples": stats.bad_samples - sent["bad"],
            "missing_samples": stats.missing_samples - sent["missing"],
            "errors": stats.errors[sent["errors"] :],
        }
        sent.update(bad=stats.bad_samples, missing=stats.missing_samples, errors=len(stats.errors))
        if items:
            images = [im for _, _, im in items]
            if not self.augment_in_loader:
                out["images"] = images  # uint8 payloads; decoded and augmented on the device per batch
            elif self.train:
                out["view1"], out["view2"] = tensor_augment.TensorTwoViews(
                    self.image_size, self.in_chans, self.seed, self.epoch
                )(images, keys)
            else:
                out["image"] = tensor_augment.eval_batch(images, self.image_size, self.in_chans)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.augment_in_loader:
            tune_for_augmentation()  # no page faults per chunk (allocator.py)
        my_parts = self.parts[worker::workers]  # DataLoader worker w of M reads every M-th of the rank's shards
        stats, sent = ReadStats(), {"bad": 0, "missing": 0, "errors": 0}

        def on_error(exn: BaseException) -> bool:  # webdataset handler: note it, go on with the next item
            if isinstance(exn, storage.ShardIntegrityError):  # a replaced or damaged shard: stop, never train on it
                raise storage.ShardIntegrityError(str(exn.args[0]).split(" @ ")[0]) from exn
            if isinstance(exn, storage.PermanentReadError):  # unknown host, 401, 403, 404: no retry can mend it
                raise storage.PermanentReadError(str(exn.args[0]).split(" @ ")[0]) from None
            stats.errors.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"[:500])
            return True

        samples = tar_samples(self._streams(my_parts), max_member_bytes=self.max_member_bytes, handler=on_error)
        samples = self._kept_samples(samples, my_parts, stats)
        if self.train:
            samples = self._shuffled(samples, random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}"))
        planned = iter(self.chunk_sizes[worker::workers] if self.chunk_sizes else ())
        size = next(planned, self.chunk_size)
        items: list = []
        for sample in samples:
            try:
                items.append(self._decode(sample))
            except Exception as exn:  # a damaged sample: count it, keep reading
                stats.bad_samples += 1
                stats.errors.append(
                    f"{sample.get('__key__')} in {sample.get('__url__')}: {type(exn).__name__}: {exn}"[:500]
                )
            if len(items) >= size:
                yield self._chunk(items, stats, sent)
                items, size = [], next(planned, self.chunk_size)
        # the last chunk carries the counts of the end of the stream (shortfalls are known only then)
        yield self._chunk(items, stats, sent)


class ShardBatches:
    """Iterable over one epoch's batches of one rank; len() is the planned step count."""

    def __init__(
        self,
        dataset: ShardStream,
        *,
        sizes: list[int] | None,
        num_samples: int | None = None,
        batch_size: int,
        num_workers: int,
        split: str,
        device: torch.device | str = "cpu",
    ):
        self.dataset, self.sizes, self.batch_size = dataset, sizes, batch_size
        self.device = torch.device(device)
        self.num_workers, self.split = num_workers, split
        if num_samples is None:  # else given: a capped set's keys in this rank's shards
            num_samples = sum(sizes) if sizes is not None else rank_count(dataset.parts)
        self.num_samples = num_samples
        self.stats = ReadStats()

    def __len__(self) -> int:
        return len(self.sizes) if self.sizes is not None else math.ceil(self.num_samples / self.batch_size)

    def raise_if_incomplete(self) -> None:
        """After a pass that must see every key: IncompleteReadError naming the first damaged shard, if any."""
        if self.stats.skipped:
            first = self.stats.errors[0] if self.stats.errors else "no detail"
            raise IncompleteReadError(
                f"split {self.split}, rank {self.dataset.rank}: {self.stats.missing_samples} samples missing and "
                f"{self.stats.bad_samples} undecodable after retries; first: {first}"
            )

    def _absorb(self, chunk: dict[str, Any]) -> None:
        self.stats.bad_samples += chunk["bad_samples"]
        self.stats.missing_samples += chunk["missing_samples"]
        for msg in map(redact, chunk["errors"]):  # URLs of signed or pipe: shards may carry credentials
            if len(self.stats.errors) < MAX_LOGGED_ERRORS:
                log.warning("split %s, rank %d: skipped: %s", self.split, self.dataset.rank, msg)
                self.stats.errors.append(msg)  # the first ones; the counts hold the rest

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.dataset.augment_in_loader:
            return self._batches()
        return prefetched(self._batches(), self._on_device, self.device)  # the next batches while this one trains

    def _on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Decode and augment a batch of loader payloads on self.device (decoding.py)."""
        d = self.dataset
        out, dropped = views_on_device(
            dict(batch),
            train=d.train,
            image_size=d.image_size,
            in_chans=d.in_chans,
            seed=d.seed,
            epoch=d.epoch,
            device=self.device,
        )
        for key in dropped:
            self.stats.bad_samples += 1
            msg = f"{key}: undecodable on {self.device}"
            if len(self.stats.errors) < MAX_LOGGED_ERRORS:
                log.warning("split %s, rank %d: skipped: %s", self.split, d.rank, msg)
                self.stats.errors.append(msg)
        return out

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.stats = ReadStats()
        # an own generator: DataLoader draws its workers' base seed from it, not from torch's global RNG
        generator = torch.Generator().manual_seed(self.dataset.seed * 1_000_003 + self.dataset.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            generator=generator,
            prefetch_factor=4 if self.num_workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )
        buffer = _Buffer()
        steps = len(self.sizes) if self.sizes is not None else None
        step, last = 0, None
        for chunk in loader:
            self._absorb(chunk)
            buffer.add(chunk)
            if steps is None:
                while len(buffer) >= self.batch_size:
                    yield buffer.take(self.batch_size)
                continue
            while step < steps and len(buffer) >= self.sizes[step]:
                last = buffer.take(self.sizes[step])
                step += 1
                yield last
            if step == steps:
                break  # planned samples delivered (max_steps may leave some unread)
        if steps is None:
            if len(buffer):
                yield buffer.take(len(buffer))
        else:
            yield from self._fill_short(buffer, steps - step, last)
        if self.stats.skipped or self.stats.padded_steps:
            log.warning(
                "split %s, rank %d: %d samples skipped (%d undecodable, %d missing), %d padded steps",
                self.split,
                self.dataset.rank,
                self.stats.skipped,
                self.stats.bad_samples,
                self.stats.missing_samples,
                self.stats.padded_steps,
            )

    def _fill_short(self, buffer: "_Buffer", remaining: int, last):
        """The rank ran short (damaged data): still yield `remaining` batches, so collectives stay in step."""
        if remaining <= 0:
            return
        m = len(buffer)
        if m >= 2 * remaining:  # enough for pairs at least: spread them
            for size in batch_sizes(m, remaining, max(1, math.ceil(m / remaining))):
                yield buffer.take(size)
            return
        pool = _Buffer()
        if m:
            pool.add(buffer.take(m))
        if last is not None and m < self.batch_size:
            pool.add(_Buffer.head(last, self.batch_size - m))
        if not len(pool):
            raise RuntimeError(
                f"split {self.split}, rank {self.dataset.rank}: no readable sample this epoch, "
                f"cannot take the {remaining} steps the other ranks take"
            )
        batch = pool.take(len(pool))
        for _ in range(remaining):
            self.stats.padded_steps += 1
            yield dict(batch)  # a fresh dict each step: the caller may replace entries (e.g. moved to a device)


class _Buffer:
    """Chunks waiting to be cut into batches."""

    TENSOR_KEYS = ("view1", "view2", "image", "label")
    LIST_KEYS = ("key", "images")  # images: uint8 payloads for the device (decoding.py)

    def __init__(self):
        self.pieces: list[dict[str, Any]] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, chunk: dict[str, Any]) -> None:
        if chunk["key"]:
            self.pieces.append({k: chunk[k] for k in (*self.TENSOR_KEYS, *self.LIST_KEYS) if k in chunk})
            self.n += len(chunk["key"])

    @staticmethod
    def head(batch: dict[str, Any], n: int) -> dict[str, Any]:
        return {name: v[:n] for name, v in batch.items()}

    def take(self, n: int) -> dict[str, Any]:
        taken, need = [], n
        while need:
            piece = self.pieces[0]
            k = len(piece["key"])
            if k <= need:
                taken.append(self.pieces.pop(0))
                need -= k
            else:
                taken.append({name: v[:need] for name, v in piece.items()})
                self.pieces[0] = {name: v[need:] for name, v in piece.items()}
                need = 0
        self.n -= n
        batch = {name: [x for p in taken for x in p[name]] for name in self.LIST_KEYS if name in taken[0]}
        for name in self.TENSOR_KEYS:
            if name in taken[0]:
                batch[name] = torch.cat([p[name] for p in taken]) if len(taken) > 1 else taken[0][name]
        return batch


def _check(manifest: Manifest, split: str, rank: int, world_size: int, batch_size: int) -> None:
    if split not in manifest.splits:
        raise ValueError(f"split {split!r} not in the manifest (has: {', '.join(manifest.splits)})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")


def _on_device(device: torch.device | str, augment_on_device: bool | None) -> bool:
    return torch.device(device).type == "cuda" if augment_on_device is None else augment_on_device


def _hashes(manifest: Manifest, names: list[str], urls: list[str]) -> dict[str, str]:
    return {url: manifest.sha256[name] for name, url in zip(names, urls) if name in manifest.sha256}


def _chunk_size(batch_size: int) -> int:
    return max(8, min(batch_size, 64))


def _chunk_plan(sizes: list[int], batch_size: int) -> list[int]:
    """Each planned batch cut into near-equal chunks of at most _chunk_size(batch_size) samples, in order."""
    cap = _chunk_size(batch_size)
    return [c for s in sizes for c in batch_sizes(s, math.ceil(s / cap), cap) if c]


def train_batches(
    manifest: Manifest,
    split: str,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    image_size: int,
    in_chans: int,
    epoch: int,
    seed: int,
    shards_url: str = "",
    max_steps: int = 0,
    shuffle_buffer: int = 1000,
    device: torch.device | str = "cpu",
    augment_on_device: bool | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> ShardBatches:
    """One epoch of two-view batches {"view1", "view2": (B,C,H,W) float, "key": list[str], "label": (B,) long}.

    Every sample of the split once per epoch across ranks (the first max_steps batches' worth when
    max_steps > 0); len() is the same on every rank; batch sizes are near-equal, at most batch_size.
    The views are made on `device`: in the loader workers for a CPU, decoded and augmented on the device for
    a GPU (augment_on_device: None = when device is CUDA; True on a CPU runs that same code path, for tests).
    """
    _check(manifest, split, rank, world_size, batch_size)
    info = manifest.splits[split]
    plan = plan_epoch(info.shard_counts, world_size, epoch=epoch, seed=seed, shuffle=True)
    steps = steps_per_epoch(plan, batch_size, max_steps)
    sizes = batch_sizes(rank_count(plan[rank]), steps, batch_size)
    dataset = _stream(
        manifest,
        split,
        shards_url,
        plan[rank],
        train=True,
        image_size=image_size,
        in_chans=in_chans,
        seed=seed,
        epoch=epoch,
        rank=rank,
        chunk_size=_chunk_size(batch_size),
        shuffle_buffer=shuffle_buffer,
        augment_in_loader=not _on_device(device, augment_on_device),
        max_member_bytes=max_member_bytes,
        chunk_sizes=_chunk_plan(sizes, batch_size),
    )
    return ShardBatches(
        dataset, sizes=sizes, batch_size=batch_size, num_workers=num_workers, split=split, device=device
    )


def _stream(manifest: Manifest, split: str, shards_url: str, parts: list[ShardPart], **kw) -> ShardStream:
    """A rank's ShardStream over `parts` of the split's shards, located and hashed as the manifest says."""
    names = manifest.splits[split].shards
    urls = [shard_url(name, manifest.shards_dir, shards_url) for name in names]
    return ShardStream(urls, parts, hashes=_hashes(manifest, names, urls), **kw)


def eval_batches(
    manifest: Manifest,
    split: str,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    image_size: int,
    in_chans: int,
    shards_url: str = "",
    device: torch.device | str = "cpu",
    augment_on_device: bool | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    only_keys: frozenset[str] | None = None,
) -> ShardBatches:
    """Deterministic single-view batches {"image", "key", "label"}; each sample exactly once across ranks,
    no padding, so ranks may take different step counts (no collectives inside encoding). `only_keys`: only
    those samples (a capped evaluation set), the others passed over before they are decoded."""
    _check(manifest, split, rank, world_size, batch_size)
    info = manifest.splits[split]
    plan = plan_epoch(info.shard_counts, world_size, shuffle=False)
    dataset = _stream(
        manifest,
        split,
        shards_url,
        plan[rank],
        train=False,
        image_size=image_size,
        in_chans=in_chans,
        seed=0,
        epoch=0,
        rank=rank,
        chunk_size=_chunk_size(batch_size),
        shuffle_buffer=0,
        augment_in_loader=not _on_device(device, augment_on_device),
        max_member_bytes=max_member_bytes,
        only_keys=only_keys,
    )
    n = None
    if only_keys is not None:  # the capped set's keys in this rank's shards (the manifest lists keys by shard)
        starts = np.cumsum([0, *info.shard_counts])
        n = sum(k in only_keys for p in plan[rank] for k in info.keys[starts[p.shard] : starts[p.shard + 1]])
    return ShardBatches(
        dataset, sizes=None, num_samples=n, batch_size=batch_size, num_workers=num_workers, split=split, device=device
    )
