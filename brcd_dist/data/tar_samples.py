"""A shard's tar stream as samples, one member at a time, with a size cap per member.

webdataset reads every member whole before anyone looks at it, so one crafted multi-gigabyte member would be
held in memory. Here the tar headers are read in stream mode (`tarfile` "r|"): a member above `max_member_bytes`
is passed over unread (its bytes still stream through the shard's sha256, which covers every byte) and its
sample is yielded as a placeholder carrying `__refused__`, so the sample keeps its position in the shard (the
epoch plan assigns positions to ranks) and the reader counts and names it like any undecodable sample.

Samples are consecutive members sharing a key (the member name up to the first dot of its base name), as
webdataset groups them: {"__key__", "__url__", EXT: bytes, ...}. This is the one tar reader: the training and
evaluation loader (data/reading.py), Ray Data's encoding (batch_encoding.py) and the shard writer's resume
(data/shards.py) all read shards through it.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # data.max_member_bytes: larger tar members are skipped unread
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image members a sample may hold, in the order looked for
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: "dir/key.ext.more"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped


def _reraise(exn: BaseException) -> bool:
    raise exn


def tar_samples(
    src: Iterable[dict[str, Any]],
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    handler: Callable[[BaseException], bool] = _reraise,
) -> Iterator[dict[str, Any]]:
    """{"url", "stream"} items -> samples. max_member_bytes = 0: no cap. A broken tar stream goes to `handler`
    (True: go on with the next shard)."""
    for item in src:
        url = item["url"]
        try:
            yield from _samples(item["stream"], url, max_member_bytes)
        except Exception as exn:
            try:  # name the shard, as webdataset does (" @ URL"; the reader's handler splits it off again)
                exn.args = (f"{exn.args[0] if exn.args else exn} @ {url}", *exn.args[1:])
            except (TypeError, AttributeError):
                pass
            if not handler(exn):
                return


def _samples(stream, url: str, cap: int) -> Iterator[dict[str, Any]]:
    sample: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            tar.members = []  # stream mode keeps every header otherwise
            if not info.isreg() or _META.match(info.name):
                continue
            m = _KEY_EXT.match(info.name)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2)
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if cap and info.size > cap:  # not read: tarfile skips its bytes as it moves to the next header
                sample.setdefault("__refused__", []).append(
                    f"{info.name}: {info.size} bytes, above data.max_member_bytes={cap}"
                )
                continue
            sample[ext] = tar.extractfile(info).read()
    if sample is not None:
        yield sample


def shard_samples(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, sha256: str | None = None):
    """The samples of one shard (a local path or any location storage.open_read takes), read through the storage
    layer (retries, byte-range re-open, the sha256 checked when given); errors propagate."""
    from brcd_dist import storage

    with storage.open_read(url, sha256=sha256) as stream:
        yield from tar_samples([{"url": url, "stream": stream}], max_member_bytes)
        stream.raw.finish()  # the tar reader stops at the end-of-archive blocks: hash the rest too
