"""Stage B: the teacher encodes its rank's part of the training split; distributed k-means over those codes
(only centroid-sized messages cross ranks); pseudo-labels keyed by __key__ and per-cluster bit masks from
all-reduced bit sums (DESIGN §2 "Pseudo-labels", "Bit masks")."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from brcd_dist.clustering.bit_masks import bit_agreement, bit_masks_from_stats, cluster_bit_stats
from brcd_dist.clustering.kmeans import distributed_kmeans
from brcd_dist.train.context import WorkerContext, all_gather_objects
from brcd_dist.train.encoding import encode_local
from brcd_dist.train.state import Clustering

log = logging.getLogger("brcd_dist.train")


def encode_train_split(ctx: WorkerContext, teacher) -> tuple[np.ndarray, list]:
    """This rank's teacher codes of the training split (deterministic view, no augmentation)."""
    codes, keys, _, _ = encode_local(ctx, {"teacher": teacher}, "train")
    return codes["teacher"], keys


def cluster_teacher_codes(ctx: WorkerContext, codes: np.ndarray, keys: list, cluster_round: int = 0) -> Clustering:
    cfg = ctx.cfg
    k = cfg.brcd.clusters
    result = distributed_kmeans(codes.astype(np.float32), k, iters=cfg.kmeans.iters, tol=cfg.kmeans.tol,
                                seed=cfg.kmeans.seed + cluster_round, spherical=cfg.kmeans.spherical)
    assignments = torch.as_tensor(result.assignments, dtype=torch.long)
    sums, counts = cluster_bit_stats(torch.as_tensor(codes), assignments, k)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)  # float64 sums of ±1: exact, so masks do not depend on the sharding
        dist.all_reduce(counts)
    masks, n_fallback = bit_masks_from_stats(sums, counts, cfg.brcd.delta)
    pseudo = {}
    for part_keys, part_labels in all_gather_objects((keys, result.assignments.tolist())):
        pseudo.update(zip(part_keys, part_labels))
    kept = masks.sum(1)
    log.info("k-means (%s): K=%d, %d iterations, inertia %.4g; bits kept per cluster min/mean/max %d/%.1f/%d; "
             "%d empty-mask fallbacks", result.backend, k, result.iterations, result.inertia[-1],
             int(kept.min()), float(kept.mean()), int(kept.max()), n_fallback)
    return Clustering(centroids=torch.as_tensor(result.centroids, dtype=torch.float32), masks=masks,
                      agreement=bit_agreement(sums, counts).float(), counts=counts, pseudo_labels=pseudo,
                      inertia=list(result.inertia), n_mask_fallback=n_fallback, backend=result.backend)


def clustering_stage(ctx: WorkerContext, teacher, cluster_round: int = 0, codes_cache: dict | None = None) -> Clustering:
    """Run stage B; `codes_cache` keeps this rank's teacher codes for later re-clustering rounds (the teacher is
    frozen, so they do not change)."""
    if codes_cache is not None and "codes" in codes_cache:
        codes, keys = codes_cache["codes"], codes_cache["keys"]
    else:
        codes, keys = encode_train_split(ctx, teacher)
        if codes_cache is not None:
            codes_cache.update(codes=codes, keys=keys)
    return cluster_teacher_codes(ctx, codes, keys, cluster_round)


def clustering_metrics(c: Clustering) -> dict:
    kept = c.masks.sum(1)
    return {"clustering/inertia": float(c.inertia[-1]), "clustering/iterations": len(c.inertia),
            "clustering/mask_bits_mean": float(kept.mean()), "clustering/mask_fallbacks": c.n_mask_fallback,
            "clustering/empty_clusters": int((c.counts == 0).sum())}
