"""Nearest-centroid assignment of codes (DESIGN §2 "Pseudo-labels").

k-means gives every training image its cluster c(i); a teacher code of an augmented view gets the cluster of its
nearest centroid. This is that lookup: plain torch, chunked so that the (rows x k) score block stays small, on
whatever device the codes are on. distributed_kmeans uses nearest_centroids as its GPU path when FAISS has no GPU.
"""

from __future__ import annotations

import contextlib

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
