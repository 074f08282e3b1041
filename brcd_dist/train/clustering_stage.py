"""Stage B: the teacher encodes its rank's part of the training split; distributed k-means over those codes
(only centroid-sized messages cross ranks); pseudo-labels keyed by __key__ and per-cluster bit masks from
all-reduced bit sums (DESIGN §2 "Pseudo-labels", "Bit masks")."""

from __future__ import annotations

import logging

import numpy as np
import torch

from brcd_dist.clustering.bit_masks import bit_agreement, bit_masks_from_stats, cluster_bit_stats
from brcd_dist.clustering.kmeans import distributed_kmeans
from brcd_dist.clustering.pseudo_labels import PseudoLabels
from brcd_dist.train.collectives import all_gather_objects, all_reduce
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.progress import StageBar
from brcd_dist.train.state import Clustering
from brcd_dist.train.teacher_cache import TeacherCodes

log = logging.getLogger("brcd_dist.train")


def kmeans_stem(ctx: WorkerContext, cluster_round: int) -> str:
    """The cache name of a k-means result of this (K, seed, iterations, geometry); the teacher and the shards are
    in TeacherCodes.file's key. The masks are not part of it: they are recomputed from the cached bit sums for
    each δ."""
    cfg, km = ctx.cfg, ctx.cfg.kmeans
    return (
        f"k{cfg.brcd.clusters}-seed{km.seed + cluster_round}-it{km.iters}-tol{km.tol:g}-"
        f"{'sph' if km.spherical else 'l2'}"
    )


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
    parts = all_gather_objects((keys, result.assignments.astype(np.int32)))
    pseudo = PseudoLabels([k for ks, _ in parts for k in ks], np.concatenate([a for _, a in parts])).to_stored()
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


def clustering_stage(ctx: WorkerContext, teacher: TeacherCodes, cluster_round: int = 0) -> Clustering:
    """Run stage B (or one re-clustering round): a cached k-means result of this teacher, or k-means over the
    teacher's codes of the training split (encoded once per run, whatever the rounds)."""
    stem = kmeans_stem(ctx, cluster_round)
    km = teacher.load(stem)
    if km is not None:
        log.info("k-means result reused from %s", teacher.file(stem))
        return clustering_from_kmeans(ctx, km)
    codes, keys = teacher.local_train()
    km = kmeans_on_codes(ctx, codes, keys, cluster_round)
    teacher.save(km, stem)
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
