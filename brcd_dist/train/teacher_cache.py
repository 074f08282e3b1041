"""Results that depend only on the frozen teacher and the shards (k-means, the teacher's codes of a split), kept
under `brcd.clustering_cache` and reused by later runs with the same teacher: Tune trials, the quality benchmark.

Every rank takes rank 0's view of whether a file is there: a rank that loaded it while another recomputed would
hang the collectives of the recomputation. Rank 0 alone writes, atomically, so that concurrent runs never read
half a file."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import torch

from brcd_dist.train.collectives import broadcast_object
from brcd_dist.train.context import WorkerContext


def teacher_digest(teacher) -> str:
    """A short hash of the teacher's weights: cached results are reusable only for the same teacher."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_file(ctx: WorkerContext, digest: str, stem: str) -> Optional[Path]:
    """`<cache>/<stem>-t<teacher digest>-d<shards digest>.pt`, or None when caching is off."""
    cache = ctx.cfg.brcd.clustering_cache
    if not cache:
        return None
    return Path(cache) / f"{stem}-t{digest}-d{ctx.manifest.digest()[:16]}.pt"


def load_cached(ctx: WorkerContext, path: Optional[Path]) -> Any:
    """The cached object on every rank, or None on every rank."""
    if path is None or not broadcast_object(path.is_file() if ctx.is_chief else None):
        return None
    return torch.load(path, weights_only=False)


def save_cached(ctx: WorkerContext, obj: Any, path: Optional[Path]) -> None:
    if path is None or not ctx.is_chief:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
