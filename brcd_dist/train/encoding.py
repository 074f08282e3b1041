"""Encoding a split with one or more hash models in parallel across ranks, then gathering the codes (packed bits)
on every rank in a fixed order (sorted by __key__), so that Hamming ranking's tie-break by database index is the
same whatever the number of ranks. A capped evaluation set (eval.max_queries, eval.max_database) is drawn from the
manifest before anything is encoded: seeded and even across the classes (`capped_keys`)."""

from __future__ import annotations

import time

import numpy as np
import torch

from brcd_dist.codes import pack_codes, probs_and_codes
from brcd_dist.data import eval_batches
from brcd_dist.data.splits import balanced_subset
from brcd_dist.train.collectives import all_gather_objects
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.precision import autocast, train_dtype
from brcd_dist.train.progress import StageBar


def capped_keys(ctx: WorkerContext, split: str, cap: int) -> frozenset[str] | None:
    """The keys of `split` an evaluation capped at `cap` items uses (None: every key): at most `cap`, as even across
    the classes as their sizes allow, drawn by data.split_seed (data/splits.balanced_subset). The manifest's order
    sorts ImageFolder keys by class, so a cut of the first keys would keep the first classes only."""
    info = ctx.manifest.splits[split]
    if not cap or cap >= info.count:
        return None
    picked = balanced_subset(np.asarray(info.labels), cap, ctx.cfg.data.split_seed)
    return frozenset(info.keys[i] for i in picked)


def _room(a: np.ndarray | None, n: int, like: np.ndarray, planned: int) -> np.ndarray:
    """`a` with room for n rows like `like`: allocated once for the rank's planned samples (doubled if more come)."""
    if a is None:
        return np.empty((max(n, planned), *like.shape[1:]), like.dtype)
    if n <= len(a):
        return a
    grown = np.empty((max(n, 2 * len(a)), *a.shape[1:]), a.dtype)
    grown[: len(a)] = a
    return grown


@torch.no_grad()
def encode_local(ctx: WorkerContext, models: dict, split: str, only_keys: frozenset[str] | None = None):
    """This rank's share of `split` (of `only_keys`, if given), encoded by each model in one pass over the data.
    Returns ({name: ±1 codes (n, L) float32}, keys, labels, {name: forward seconds}).

    Codes and labels go into arrays allocated once for the rank's share, not into a list of small tensors a batch:
    kept small blocks land in the holes that each batch's freed images leave in the C heap, which then cannot be
    reused, and the process grew by about a batch of images every batch (6 GB on one rank for 640k images)."""
    codes: dict = {name: None for name in models}
    seconds = {name: 0.0 for name in models}
    keys, labels, n = [], None, 0
    for m in models.values():
        m.eval()
    batches = eval_batches(
        ctx.manifest, split, batch_size=ctx.cfg.eval.batch_size, only_keys=only_keys, **ctx.loader_kwargs()
    )
    planned = batches.num_samples
    bar = StageBar(f"encode {split} ({', '.join(models)})", len(batches), "batch", chief=ctx.is_chief)
    for batch in batches:
        x, k = batch["image"].to(ctx.device), len(batch["key"])
        for name, model in models.items():
            t0 = time.perf_counter()
            with autocast(ctx.device, train_dtype(ctx.cfg.train, ctx.device)):
                logits = model(x.to(next(model.parameters()).dtype))
            c = probs_and_codes(logits.float())[1].cpu().numpy()  # sign(σ(l) − ½), as HashModel.encode and training
            if ctx.use_gpu:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t0
            codes[name] = _room(codes[name], n + k, c, planned)
            codes[name][n : n + k] = c
        label = batch["label"].numpy()
        labels = _room(labels, n + k, label, planned)
        labels[n : n + k] = label
        keys.extend(batch["key"])
        n += k
        bar.update(1)
    bar.close(line=False)  # evaluation encodes every epoch: a bar, not a line each
    batches.raise_if_incomplete()  # k-means and mAP need every key: fail before a cache or checkpoint holds less
    out = {
        name: codes[name][:n] if codes[name] is not None else np.zeros((0, models[name].bits), np.float32)
        for name in models
    }
    return out, keys, labels[:n] if labels is not None else np.zeros((0,), np.int64), seconds


def gather_codes(ctx: WorkerContext, codes: dict, keys: list, labels: np.ndarray, bits: int):
    """All ranks' codes, packed to bits (codes.pack_codes: what the ranking reads), concatenated and sorted by key,
    on every rank; with their keys and labels."""
    parts = all_gather_objects(({n: pack_codes(c) for n, c in codes.items()}, keys, labels))
    all_keys = [k for _, ks, _ in parts for k in ks]
    order = np.argsort(np.array(all_keys, dtype=object), kind="stable") if all_keys else np.zeros(0, np.int64)
    gathered = {}
    for name in codes:
        packed = np.concatenate([p[name] for p, _, _ in parts]) if all_keys else np.zeros((0, bits // 8), np.uint8)
        gathered[name] = packed[order]
    all_labels = np.concatenate([lab for _, _, lab in parts])[order]
    return gathered, [all_keys[i] for i in order], all_labels


def encode_split(ctx: WorkerContext, models: dict, split: str, only_keys: frozenset[str] | None = None):
    """Encode `split` (or its `only_keys`) across ranks; every rank gets ({name: packed codes}, keys, labels,
    {name: images/s per worker})."""
    bits = next(iter(models.values())).bits
    local, keys, labels, seconds = encode_local(ctx, models, split, only_keys)
    n_local = len(keys)
    rates = {n: (n_local / s if s > 0 else 0.0) for n, s in seconds.items()}
    # Mean per-worker encode rate over ranks (each worker had the same CPU/GPU share).
    all_rates = all_gather_objects(rates)
    rates = {n: float(np.mean([r[n] for r in all_rates])) for n in models}
    codes, keys, labels = gather_codes(ctx, local, keys, labels, bits)
    return codes, keys, labels, rates
