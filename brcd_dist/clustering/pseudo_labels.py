"""Nearest-centroid assignment of codes (DESIGN §2 "Pseudo-labels").

k-means gives every training image its cluster c(i); a teacher code of an augmented view gets the cluster of its
nearest centroid. This is that lookup: plain torch, chunked so that the (rows x k) score block stays small, on
whatever device the codes are on. distributed_kmeans uses nearest_centroids as its GPU path when FAISS has no GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

# Rows per chunk are chosen so that one (rows, k) float32 score block holds about this many entries:
# 64 MiB on the CPU, 256 MiB on a GPU (fewer, larger matmuls).
_BLOCK_ENTRIES = {"cpu": 1 << 24, "cuda": 1 << 26}


@contextlib.contextmanager
def _full_fp32(device: torch.device):
    """No TF32 in the score matmul, even if the training code allowed it: its 10-bit mantissa flips near ties."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _as_float_tensor(a, device=None) -> torch.Tensor:
    t = torch.as_tensor(a)  # numpy or torch, no copy when already float32
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def nearest_centroids(
    x, centroids, spherical: bool = False, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) points, (k, d) centroids -> (labels (N,) int64, squared L2 distance to that centroid (N,) float32).

    L2: argmin ||x - c||², computed as ||c||² - 2 x.c like FAISS's flat index. spherical: argmax of the cosine
    between x and c (centroids are normalised here). Ties go to the lowest centroid index. Both results live on x's
    device; the distance is clamped at 0 (the expansion can round a zero distance slightly below it).
    """
    x = _as_float_tensor(x)
    c = _as_float_tensor(centroids, x.device)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(
            f"nearest_centroids: x {tuple(x.shape)} and centroids {tuple(c.shape)} must be (N, d) and (k, d)"
        )
    if c.shape[0] == 0:
        raise ValueError("nearest_centroids: no centroids")
    if spherical:
        c = c / c.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    c_sq = (c * c).sum(dim=1)
    n = x.shape[0]
    step = chunk_size or max(1, _BLOCK_ENTRIES.get(x.device.type, 1 << 24) // c.shape[0])
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    with _full_fp32(x.device):
        for s in range(0, n, step):
            xb = x[s : s + step]
            ip = xb @ c.T
            if spherical:
                best_ip, lab = ip.max(dim=1)  # unit-norm centroids: max cosine == max inner product
                best = c_sq[lab] - 2 * best_ip
            else:
                best, lab = (c_sq - 2 * ip).min(dim=1)
            labels[s : s + step] = lab
            dist[s : s + step] = ((xb * xb).sum(dim=1) + best).clamp_min(0)
    return labels, dist


def assign_nearest(x, centroids, spherical: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Cluster id (N,) int64 of each code's nearest centroid, on x's device (see nearest_centroids)."""
    return nearest_centroids(x, centroids, spherical=spherical, chunk_size=chunk_size)[0]


class PseudoLabels(Mapping):
    """__key__ -> cluster id of every training image, as two sorted arrays: the keys as fixed-width UTF-8 bytes
    and int32 ids, a few bytes a key in every process where a dict takes about 150 (1.28M keys: ~20 MB, not ~190).
    A read-only mapping; `lookup` maps a batch's keys at once."""

    def __init__(self, keys: Iterable[str], labels: Iterable[int]):
        k = np.asarray([str(x).encode() for x in keys], dtype=bytes)
        order = np.argsort(k, kind="stable")
        self._keys, self._ids = k[order], np.asarray(list(labels), dtype=np.int32)[order]
        if len(self._keys) != len(self._ids):
            raise ValueError(f"PseudoLabels: {len(self._keys)} keys but {len(self._ids)} labels")

    @classmethod
    def of(cls, value) -> "PseudoLabels":
        """From a PseudoLabels, a {key: id} dict (a file from before), or `to_stored`'s form."""
        if isinstance(value, PseudoLabels):
            return value
        if isinstance(value, dict) and set(value) == {"key_bytes", "labels"}:
            raw = value["key_bytes"].numpy()
            out = cls.__new__(cls)
            out._keys = raw.view(f"S{raw.shape[1]}").reshape(-1) if raw.size else np.zeros(0, dtype="S1")
            out._ids = value["labels"].numpy().astype(np.int32)
            return out
        return cls(value.keys(), value.values())

    def to_stored(self) -> dict:
        """Tensors only, for a weights_only file: the keys as a (N, width) uint8 matrix, the ids as int32."""
        width = max(1, self._keys.dtype.itemsize)
        raw = np.ascontiguousarray(self._keys.astype(f"S{width}")).view(np.uint8).reshape(len(self._keys), width)
        return {"key_bytes": torch.from_numpy(raw.copy()), "labels": torch.from_numpy(self._ids.copy())}

    def lookup(self, keys: Sequence[str], missing: int = -1) -> np.ndarray:
        """int64 ids of `keys`, `missing` for a key it does not hold."""
        q = np.asarray([str(x).encode() for x in keys], dtype=bytes)
        if not len(self._keys) or not len(q):
            return np.full(len(q), missing, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._keys, q), len(self._keys) - 1)
        found = self._keys[at] == q
        return np.where(found, self._ids[at], missing).astype(np.int64)

    def __getitem__(self, key: str) -> int:
        label = int(self.lookup([key])[0])
        if label == -1 and not self.__contains__(key):
            raise KeyError(key)
        return label

    def __contains__(self, key) -> bool:
        q = str(key).encode()
        at = int(np.searchsorted(self._keys, q))
        return at < len(self._keys) and self._keys[at] == q

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self._keys)

    def __len__(self) -> int:
        return len(self._keys)
