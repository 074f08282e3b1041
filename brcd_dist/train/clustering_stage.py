"""Stage B: the teacher encodes its rank's part of the training split; distributed k-means over those codes
(only centroid-sized messages cross ranks); pseudo-labels keyed by __key__ and per-cluster bit masks from
all-reduced bit sums (DESIGN §2 "Pseudo-labels", "Bit masks")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from brcd_dist.clustering.bit_masks import bit_agreement, bit_masks_from_stats, cluster_bit_stats
from brcd_dist.clustering.kmeans import distributed_kmeans
from brcd_dist.train.collectives import all_gather_objects, all_reduce
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.encoding import encode_local
from brcd_dist.train.progress import StageBar
from brcd_dist.train.state import Clustering
from brcd_dist.train.teacher_cache import cache_file, load_cached, save_cached, teacher_digest

log = logging.getLogger("brcd_dist.train")


def encode_train_split(ctx: WorkerContext, teacher) -> tuple[np.ndarray, list]:
    """This rank's teacher codes of the training split (deterministic view, no augmentation)."""
    codes, keys, _, _ = encode_local(ctx, {"teacher": teacher}, "train")
    return codes["teacher"], keys


def cache_path(ctx: WorkerContext, teacher, cluster_round: int) -> Optional[Path]:
    """Where the k-means result for this (teacher, shards, K, seed, iterations, geometry) lives, if caching is on.
    The masks are not part of the key: they are recomputed from the cached bit sums for each δ."""
    if not ctx.cfg.brcd.clustering_cache:
        return None
    cfg, km = ctx.cfg, ctx.cfg.kmeans
    stem = (
        f"k{cfg.brcd.clusters}-seed{km.seed + cluster_round}-it{km.iters}-tol{km.tol:g}-"
        f"{'sph' if km.spherical else 'l2'}"
    )
    return cache_file(ctx, teacher_digest(teacher), stem)


def kmeans_on_codes(ctx: WorkerContext, codes: np.ndarray, keys: list, cluster_round: int) -> dict:
    """Distributed k-means + all-reduced bit sums; every rank returns the same global result."""
    cfg = ctx.cfg
    k = cfg.brcd.clusters
    bar = StageBar(f"k-means K={k}", cfg.kmeans.iters, "iteration", chief=ctx.is_chief)
    result = distributed_kmeans(
        codes.astype(np.float32),
        k,
        iters=cfg.kmeans.iters,
        tol=cfg.kmeans.tol,
        seed=cfg.kmeans.seed + cluster_round,
        spherical=cfg.kmeans.spherical,
        on_iteration=lambda s: bar.update(1, inertia=float(s.inertia[-1])),
    )
    bar.close()
    assignments = torch.as_tensor(result.assignments, dtype=torch.long)
    sums, counts = cluster_bit_stats(torch.as_tensor(codes), assignments, k)
    sums = all_reduce(sums)  # float64 sums of ±1: exact, so masks do not depend on the sharding
    counts = all_reduce(counts)
    pseudo = {}
    for part_keys, part_labels in all_gather_objects((keys, result.assignments.tolist())):
        pseudo.update(zip(part_keys, part_labels))
    return {
        "centroids": torch.as_tensor(result.centroids, dtype=torch.float32),
        "sums": sums,
        "counts": counts,
        "pseudo_labels": pseudo,
        "inertia": list(result.inertia),
        "backend": result.backend,
    }


def clustering_from_kmeans(ctx: WorkerContext, km: dict) -> Clustering:
    """Pseudo-labels and per-cluster bit masks at this run's δ (DESIGN §2 "Bit masks")."""
    masks, n_fallback = bit_masks_from_stats(km["sums"], km["counts"], ctx.cfg.brcd.delta)
    kept = masks.sum(1)
    log.info(
        "k-means (%s): K=%d, %d iterations, inertia %.4g; bits kept per cluster min/mean/max %d/%.1f/%d; "
        "%d empty-mask fallbacks",
        km["backend"],
        len(masks),
        len(km["inertia"]),
        km["inertia"][-1],
        int(kept.min()),
        float(kept.mean()),
        int(kept.max()),
        n_fallback,
    )
    return Clustering(
        centroids=km["centroids"],
        masks=masks,
        agreement=bit_agreement(km["sums"], km["counts"]).float(),
        counts=km["counts"],
        pseudo_labels=km["pseudo_labels"],
        inertia=km["inertia"],
        n_mask_fallback=n_fallback,
        backend=km["backend"],
    )


def clustering_stage(
    ctx: WorkerContext, teacher, cluster_round: int = 0, codes_cache: dict | None = None
) -> Clustering:
    """Run stage B; `codes_cache` keeps this rank's teacher codes for later re-clustering rounds (the teacher is
    frozen, so they do not change)."""
    cached = cache_path(ctx, teacher, cluster_round)
    km = load_cached(ctx, cached)
    if km is not None:
        log.info("k-means result reused from %s", cached)
        return clustering_from_kmeans(ctx, km)
    if codes_cache is not None and "codes" in codes_cache:
        codes, keys = codes_cache["codes"], codes_cache["keys"]
    else:
        codes, keys = encode_train_split(ctx, teacher)
        if codes_cache is not None:
            codes_cache.update(codes=codes, keys=keys)
    km = kmeans_on_codes(ctx, codes, keys, cluster_round)
    save_cached(ctx, km, cached)
    return clustering_from_kmeans(ctx, km)


def clustering_metrics(c: Clustering) -> dict:
    kept = c.masks.sum(1)
    return {
        "clustering/inertia": float(c.inertia[-1]),
        "clustering/iterations": len(c.inertia),
        "clustering/mask_bits_mean": float(kept.mean()),
        "clustering/mask_fallbacks": c.n_mask_fallback,
        "clustering/empty_clusters": int((c.counts == 0).sum()),
    }
