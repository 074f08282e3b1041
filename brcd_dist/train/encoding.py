"""Encoding a split with one or more hash models in parallel across ranks, then gathering the codes on every
rank in a fixed order (sorted by __key__), so that Hamming ranking's tie-break by database index is the same
whatever the number of ranks."""

from __future__ import annotations

import time

import numpy as np
import torch

from brcd_dist.codes import pack_codes, probs_and_codes, unpack_codes
from brcd_dist.data import eval_batches
from brcd_dist.train.collectives import all_gather_objects
from brcd_dist.train.context import WorkerContext
from brcd_dist.train.precision import autocast, train_dtype
from brcd_dist.train.progress import StageBar


@torch.no_grad()
def encode_local(ctx: WorkerContext, models: dict, split: str):
    """This rank's share of `split`, encoded by each model in one pass over the data.
    Returns ({name: ±1 codes (n, L) float32}, keys, labels, {name: forward seconds})."""
    codes = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    keys, labels = [], []
    for m in models.values():
        m.eval()
    batches = eval_batches(ctx.manifest, split, batch_size=ctx.cfg.eval.batch_size, **ctx.loader_kwargs())
    bar = StageBar(f"encode {split} ({', '.join(models)})", len(batches), "batch", chief=ctx.is_chief)
    for batch in batches:
        x = batch["image"].to(ctx.device)
        for name, model in models.items():
            t0 = time.perf_counter()
            with autocast(ctx.device, train_dtype(ctx.cfg.train, ctx.device)):
                logits = model(x.to(next(model.parameters()).dtype))
            c = probs_and_codes(logits.float())[1].cpu()  # sign(σ(l) − ½), as HashModel.encode and training
            if ctx.use_gpu:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t0
            codes[name].append(c)
        keys.extend(batch["key"])
        labels.append(batch["label"])
        bar.update(1)
    bar.close(line=False)  # evaluation encodes every epoch: a bar, not a line each
    batches.raise_if_incomplete()  # k-means and mAP need every key: fail before a cache or checkpoint holds less
    out = {n: (torch.cat(c).numpy() if c else np.zeros((0, models[n].bits), np.float32)) for n, c in codes.items()}
    lab = torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64)
    return out, keys, lab, seconds


def gather_codes(ctx: WorkerContext, codes: dict, keys: list, labels: np.ndarray, bits: int, max_items: int = 0):
    """All ranks' codes (packed to bits for the wire), concatenated and sorted by key; optionally the first
    `max_items` of that order (for quick evaluations)."""
    parts = all_gather_objects(({n: pack_codes(c) for n, c in codes.items()}, keys, labels))
    all_keys = [k for _, ks, _ in parts for k in ks]
    order = np.argsort(np.array(all_keys, dtype=object), kind="stable") if all_keys else np.zeros(0, np.int64)
    if max_items:
        order = order[:max_items]
    gathered = {}
    for name in codes:
        packed = np.concatenate([p[name] for p, _, _ in parts]) if all_keys else np.zeros((0, bits // 8), np.uint8)
        gathered[name] = unpack_codes(packed, bits)[order]
    all_labels = np.concatenate([lab for _, _, lab in parts])[order]
    return gathered, [all_keys[i] for i in order], all_labels


def encode_split(ctx: WorkerContext, models: dict, split: str, max_items: int = 0):
    """Encode `split` across ranks; every rank gets ({name: codes}, keys, labels, {name: images/s per worker})."""
    bits = next(iter(models.values())).bits
    local, keys, labels, seconds = encode_local(ctx, models, split)
    n_local = len(keys)
    rates = {n: (n_local / s if s > 0 else 0.0) for n, s in seconds.items()}
    # Mean per-worker encode rate over ranks (each worker had the same CPU/GPU share).
    all_rates = all_gather_objects(rates)
    rates = {n: float(np.mean([r[n] for r in all_rates])) for n in models}
    codes, keys, labels = gather_codes(ctx, local, keys, labels, bits, max_items)
    return codes, keys, labels, rates
