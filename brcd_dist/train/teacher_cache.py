"""Results that depend only on the frozen teacher and the shards (k-means, the teacher's codes of a split), kept
under `brcd.clustering_cache` and reused by later runs with the same teacher: Tune trials, the quality benchmark.

Every rank takes rank 0's view of whether a file is there: a rank that loaded it while another recomputed would
hang the collectives of the recomputation. Rank 0 alone writes, atomically, so that concurrent runs never read
half a file."""

from __future__ import annotations

import hashlib
import io
from typing import Any, Optional

import numpy as np
import torch

from brcd_dist import storage
from brcd_dist.train.collectives import broadcast_object
from brcd_dist.train.context import WorkerContext


def teacher_digest(teacher) -> str:
    """A short hash of the teacher's weights: cached results are reusable only for the same teacher.

    Floating tensors are hashed as float32 bytes, whatever their dtype: numpy has no bfloat16 (a teacher trained in
    DeepSpeed's bf16 mode elsewhere arrives in it), and a bf16 teacher and its exact fp32 copy (a `teacher.pt` loads
    as fp32) are the same teacher. The bytes go through a uint8 view, never through numpy's dtypes.
    """
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        h.update(name.encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_file(ctx: WorkerContext, digest: str, stem: str) -> Optional[str]:
    """`<cache>/<stem>-t<teacher digest>-d<shards digest>.pt` (a local path or s3://...), or None when caching
    is off."""
    cache = ctx.cfg.brcd.clustering_cache
    if not cache:
        return None
    return storage.join(cache, f"{stem}-t{digest}-d{ctx.manifest.digest()[:16]}.pt")


NUMPY_KEYS = "_numpy_keys"  # a cached dict's entries that were numpy arrays, stored as tensors


def to_stored(obj: Any) -> Any:
    """A dict's numpy arrays as tensors, so that the file loads with weights_only=True (no pickled numpy)."""
    if not isinstance(obj, dict):
        return obj
    arrays = [k for k, v in obj.items() if isinstance(v, np.ndarray)]
    out = {k: torch.from_numpy(v) if k in arrays else v for k, v in obj.items()}
    return {**out, NUMPY_KEYS: arrays} if arrays else out


def from_stored(obj: Any) -> Any:
    if not isinstance(obj, dict) or NUMPY_KEYS not in obj:
        return obj
    arrays = obj.pop(NUMPY_KEYS)
    return {k: v.numpy() if k in arrays else v for k, v in obj.items()}


def load_cached(ctx: WorkerContext, path: Optional[str]) -> Any:
    """The cached object on every rank, or None on every rank (every rank reads it: a shared location). Loaded
    with weights_only=True: the cache is shared across runs and trials, and a crafted file must not run code."""
    if path is None or not broadcast_object(storage.is_file(path) if ctx.is_chief else None):
        return None
    return from_stored(torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True))


def save_cached(ctx: WorkerContext, obj: Any, path: Optional[str]) -> None:
    if path is None or not ctx.is_chief:
        return
    with storage.open_write(path) as f:  # atomic: concurrent runs never read half a file
        torch.save(to_stored(obj), f)
