"""The frozen teacher and everything derived from it alone (with the shards): its codes of the training split
for k-means, its gathered codes of the evaluation splits, the k-means results. `TeacherCodes` is built once per
worker by run_stages and is the only holder of them: in memory for the run, and on disk under `train.teacher_cache`
(teacher_reuse.TeacherPlan.cache) for later runs with the same teacher: a rerun, Tune trials, the quality benchmark.

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
from brcd_dist.train.encoding import capped_keys, encode_local, encode_split


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


class TeacherCodes:
    """The frozen teacher of a run and its codes, computed at most once per run and once per cache.

    `local_train()` is this rank's share of the training split (k-means and the bit statistics: every clustering
    round reuses it); `gathered(split, cap)` is a split's packed codes on every rank in key order (evaluation; the
    capped set of encoding.capped_keys), with the teacher's encode rate in `throughput` (a cache hit reports the
    rate measured when the codes were made); `own_map` is the teacher's own mAP of a query split, which does not
    change during a run. `load(stem)` / `save(obj, stem)` keep other teacher-derived results (k-means) by the
    same key.
    """

    def __init__(self, ctx: WorkerContext, teacher, cache: str = ""):
        self.ctx, self.teacher, self.cache = ctx, teacher, cache
        self._digest = ""
        self._local: Optional[tuple[np.ndarray, list]] = None
        self._gathered: dict = {}
        self._own: dict = {}
        self.throughput: dict = {}

    def file(self, stem: str) -> Optional[str]:
        """`<cache>/<stem>-t<teacher digest>-d<shards digest>.pt` (a local path or s3://...), or None when
        caching is off. The teacher's digest hashes every weight: computed once, on first use."""
        if not self.cache:
            return None
        if not self._digest:
            self._digest = teacher_digest(self.teacher)
        return storage.join(self.cache, f"{stem}-t{self._digest}-d{self.ctx.manifest.digest()[:16]}.pt")

    def load(self, stem: str) -> Any:
        return load_cached(self.ctx, self.file(stem))

    def save(self, obj: Any, stem: str) -> None:
        save_cached(self.ctx, obj, self.file(stem))

    def local_train(self) -> tuple[np.ndarray, list]:
        """This rank's teacher codes of the training split (deterministic view, no augmentation) and their keys."""
        if self._local is None:
            codes, keys, _, _ = encode_local(self.ctx, {"teacher": self.teacher}, "train")
            self._local = codes["teacher"], keys
        return self._local

    def gathered(self, split: str, cap: int) -> tuple[np.ndarray, list, np.ndarray]:
        """(packed codes, keys, labels) of `split`'s evaluation set in key order on every rank, from memory, the
        cache or an encoding pass."""
        if split not in self._gathered:
            seed = self.ctx.cfg.data.split_seed
            stem = f"packed-{split}-n{cap}-s{seed}" if cap else f"packed-{split}"
            saved = self.load(stem)
            if saved is None:
                only = capped_keys(self.ctx, split, cap)
                codes, keys, labels, rates = encode_split(self.ctx, {"teacher": self.teacher}, split, only)
                saved = {"codes": codes["teacher"], "keys": keys, "labels": labels, "images_per_s": rates["teacher"]}
                self.save(saved, stem)
            self._gathered[split] = (saved["codes"], list(saved["keys"]), saved["labels"])
            if split == "database":
                self.throughput["teacher_images_per_s"] = saved["images_per_s"]
        return self._gathered[split]

    def own_map(self, query_split: str, compute) -> Any:
        """The teacher's own result on `query_split`, `compute()` once per run (its codes never change)."""
        if query_split not in self._own:
            self._own[query_split] = compute()
        return self._own[query_split]
