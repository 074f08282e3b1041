"""Per-cluster bit masks (DESIGN §2 "Bit masks").

μ_kb = mean of the teacher's ±1 codes over cluster k's members; the mask keeps bit b of cluster k iff |μ_kb| >= δ.
A cluster whose mask would be empty, or which has no members, keeps all bits and is counted in n_fallback.

Stats are split from masks so that a distributed run can all_reduce (sums, counts) across ranks first: sums of ±1
values are integers, exact in float64, so the masks do not depend on how the training split is sharded.
The authors' release applied two np.where in a row, which made every mask all zeros for δ < 1; tests pin this.
"""

from __future__ import annotations

import torch


def cluster_bit_stats(codes, labels, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """±1 codes (N, L) and cluster ids (N,) -> (sums (k, L) float64, counts (k,) int64) on the codes' device."""
    codes = torch.as_tensor(codes)  # numpy or torch
    labels = torch.as_tensor(labels).to(device=codes.device, dtype=torch.long)
    if codes.ndim != 2 or labels.shape != (codes.shape[0],):
        raise ValueError(f"cluster_bit_stats: codes {tuple(codes.shape)} and labels {tuple(labels.shape)} do not match")
    if labels.numel() and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"cluster_bit_stats: labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    sums = torch.zeros(k, codes.shape[1], dtype=torch.float64, device=codes.device)
    sums.index_add_(0, labels, codes.to(torch.float64))
    counts = torch.bincount(labels, minlength=k).to(torch.int64)
    return sums, counts


def bit_agreement(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """|μ_kb| (k, L) float64: how strongly cluster k agrees on bit b (0 for a cluster without members)."""
    mu = sums / counts.clamp_min(1).to(sums.dtype).unsqueeze(1)  # correctly rounded, so |μ| == δ compares exactly
    return mu.abs()


def bit_masks_from_stats(sums: torch.Tensor, counts: torch.Tensor, delta: float) -> tuple[torch.Tensor, int]:
    """(sums, counts) -> (masks (k, L) float32 {0,1}, n_fallback): m_kb = 1 iff |μ_kb| >= δ; empty masks keep all
    bits."""
    keep = bit_agreement(sums, counts) >= delta
    fallback = (counts == 0) | ~keep.any(dim=1)
    keep[fallback] = True
    return keep.to(torch.float32), int(fallback.sum())


def bit_masks(codes, labels, k: int, delta: float) -> tuple[torch.Tensor, int]:
    """One-process shortcut: cluster_bit_stats then bit_masks_from_stats."""
    sums, counts = cluster_bit_stats(codes, labels, k)
    return bit_masks_from_stats(sums, counts, delta)
