"""Hash retrieval evaluation (DESIGN §3): Hamming ranking, mAP@K, precision@K, precision-recall by radius.

Ranking order is (Hamming distance, database index): ties go to the lower index, so mAP is reproducible
(the authors' code broke ties by an unstable argsort). Queries are processed in chunks sized so that one
chunk's distance matrix stays near `CHUNK_ELEMENTS` entries: a 1M-code database fits in memory.

Distances come from a matmul of ±1 codes (`hamming = (L - a·b) / 2`, exact in float32 for L < 2^24), then
`topk` of the key `distance * N + index`, unique per database item, so the top-k is exact and its order
is the stable order; the key is float32 while it is exact (< 2^24) and float64 beyond.
FAISS's binary k-NN was not used: its order among equal distances is not specified.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

PARADIGMS = {"sshp": ("student", "student"), "ashp": ("student", "teacher")}  # (query encoder, database encoder)
TEACHER_PARADIGM = ("teacher", "teacher")  # the teacher's own mAP, reported beside SSHP/ASHP
CHUNK_ELEMENTS = 1 << 24  # entries of one (queries x database) block: 64 MB float32


def _codes(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected (N, bits) ±1 codes, got shape {tuple(t.shape)}")
    t = t.float()
    if t.numel() and not bool((t.abs() == 1).all()):
        raise ValueError(f"{name}: codes must be ±1 (pack/unpack with brcd_dist.codes)")
    return t


def _labels(x, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim not in (1, 2) or t.shape[0] != n:
        raise ValueError(f"{name}: expected ({n},) int labels or ({n}, C) multi-hot, got shape {tuple(t.shape)}")
    return t.float() if t.ndim == 2 else t  # multi-hot: relevance is a label-matrix product


def _query_chunk(n_db: int, query_chunk: int | None) -> int:
    return query_chunk or max(1, CHUNK_ELEMENTS // max(n_db, 1))


def _hamming(q: torch.Tensor, db_t: torch.Tensor, bits: int) -> torch.Tensor:
    """(Q, N) float distances from ±1 codes: (L - q·d) / 2, one fused matmul, exact small integers."""
    return torch.addmm(torch.tensor(bits / 2, device=q.device), q, db_t, alpha=-0.5)


def _chunks(query_codes, db_codes, k: int | None, query_chunk: int | None
            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yield (start, distances (c, N), top-k indices (c, k) in (distance, index) order, or None if k is None)."""
    # Work where the query codes are (a GPU tensor stays on the GPU); numpy input runs on the CPU.
    device = query_codes.device if torch.is_tensor(query_codes) else torch.device("cpu")
    q, db = _codes(query_codes, "query_codes").to(device), _codes(db_codes, "db_codes").to(device)
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"query codes have {q.shape[1]} bits, database codes {db.shape[1]}")
    n, bits = db.shape
    key_dtype = torch.float32 if (bits + 1) * n <= (1 << 24) else torch.float64
    index = torch.arange(n, device=device, dtype=key_dtype)
    db_t = db.T.contiguous()
    step = _query_chunk(n, query_chunk)
    for start in range(0, q.shape[0], step):
        dist = _hamming(q[start:start + step], db_t, bits)
        top = None
        if k is not None:
            key = dist.to(key_dtype).mul_(n).add_(index)  # unique per item: distance first, then index
            top = key.topk(k, dim=1, largest=False, sorted=True).indices
        yield start, dist, top


def _check_k(k: int, n_db: int) -> int:
    if k < 1:
        raise ValueError(f"topk={k}: must be >= 1")
    return min(int(k), n_db)  # K beyond the database ranks everything (mAP@all)


def hamming_topk(query_codes, db_codes, k: int, *, query_chunk: int | None = None) -> np.ndarray:
    """np.int64 (Q, k) database indices by increasing Hamming distance, ties broken by lower index."""
    k = _check_k(k, len(db_codes))
    return torch.cat([top for _, _, top in _chunks(query_codes, db_codes, k, query_chunk)]).cpu().numpy().astype(np.int64)


def _relevance(q_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """(c, N) bool: does database item j share a label with query i (int labels, or multi-hot: any class)."""
    if q_labels.ndim == 1:
        return db_labels[None, :] == q_labels[:, None]
    return (q_labels @ db_labels.T) > 0


def _ranked_relevance(query_codes, db_codes, query_labels, db_labels, topk: int, query_chunk: int | None):
    """Yield (c, k) bool relevance of each query chunk's ranked top-k list."""
    n_db = len(db_codes)
    k = _check_k(topk, n_db)
    ql = _labels(query_labels, len(query_codes), "query_labels")
    dl = _labels(db_labels, n_db, "db_labels")
    if ql.ndim != dl.ndim:
        raise ValueError("query_labels and db_labels must both be int labels or both multi-hot")
    for start, _, top in _chunks(query_codes, db_codes, k, query_chunk):
        top = top.cpu()
        q = ql[start:start + top.shape[0]]
        if q.ndim == 1:  # cheap path: compare the k retrieved labels only
            yield dl[top] == q[:, None]
        else:
            yield _relevance(q, dl).gather(1, top)


def average_precision_at_k(relevant: torch.Tensor) -> torch.Tensor:
    """AP@K per row of a ranked (Q, K) bool relevance matrix.

    DeepHash convention: mean of precision@i over the ranks i in the top K that hold a relevant item, i.e.
    divided by the number of relevant items retrieved in the top K (not by all relevant items in the
    database); a query with no relevant item in its top K scores 0 (DESIGN §3).
    """
    rel = relevant.double()
    hits = rel.cumsum(1)
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    n_hit = rel.sum(1)
    return torch.where(n_hit > 0, (hits / ranks * rel).sum(1) / n_hit.clamp(min=1), 0.0)


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, topk: int, *,
                           query_chunk: int | None = None) -> float:
    """mAP@topk by Hamming ranking; relevant = shares a label (see `average_precision_at_k`)."""
    aps = [average_precision_at_k(rel) for rel in
           _ranked_relevance(query_codes, db_codes, query_labels, db_labels, topk, query_chunk)]
    return float(torch.cat(aps).mean()) if aps else 0.0


def precision_at_k(query_codes, db_codes, query_labels, db_labels, k: int, *,
                   query_chunk: int | None = None) -> float:
    """Mean over queries of (relevant items among the first k ranked) / k."""
    precs = [rel.double().mean(1) for rel in
             _ranked_relevance(query_codes, db_codes, query_labels, db_labels, k, query_chunk)]
    return float(torch.cat(precs).mean()) if precs else 0.0


def pr_curve(query_codes, db_codes, query_labels, db_labels, *, query_chunk: int | None = None) -> dict:
    """Precision and recall of Hamming-ball retrieval at each radius r = 0..L.

    Retrieved at r = database items within distance <= r. Per query: precision = relevant retrieved /
    retrieved, recall = relevant retrieved / relevant in the database; each is averaged over the queries
    for which it is defined (precision: >= 1 item retrieved, recall: >= 1 relevant item), and is NaN at a
    radius where no query defines it. Returns {"radius", "precision", "recall"} as numpy arrays of L + 1.
    """
    n_db = len(db_codes)
    bits = torch.as_tensor(db_codes).shape[1]
    ql = _labels(query_labels, len(query_codes), "query_labels")
    dl = _labels(db_labels, n_db, "db_labels")
    prec_sum = torch.zeros(bits + 1, dtype=torch.float64)
    prec_n = torch.zeros(bits + 1, dtype=torch.float64)
    rec_sum = torch.zeros(bits + 1, dtype=torch.float64)
    rec_n = 0
    for start, dist, _ in _chunks(query_codes, db_codes, None, query_chunk):
        dist = dist.cpu().long()
        rel = _relevance(ql[start:start + dist.shape[0]], dl).double()
        # per-row histograms over radii, then cumulative counts "within distance <= r"
        retrieved = torch.zeros(dist.shape[0], bits + 1, dtype=torch.float64).scatter_add_(
            1, dist, torch.ones_like(rel)).cumsum(1)
        hits = torch.zeros_like(retrieved).scatter_add_(1, dist, rel).cumsum(1)
        n_rel = rel.sum(1, keepdim=True)
        has_ret = retrieved > 0
        prec_sum += torch.where(has_ret, hits / retrieved.clamp(min=1), 0.0).sum(0)
        prec_n += has_ret.sum(0)
        has_rel = n_rel[:, 0] > 0
        rec_sum += (hits[has_rel] / n_rel[has_rel]).sum(0)
        rec_n += int(has_rel.sum())
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    precision = torch.where(prec_n > 0, prec_sum / prec_n.clamp(min=1), nan)
    recall = rec_sum / rec_n if rec_n else torch.full_like(rec_sum, float("nan"))
    return {"radius": np.arange(bits + 1), "precision": precision.numpy(), "recall": recall.numpy()}


def evaluate_paradigms(codes: dict, query_labels, db_labels, topk: int, *,
                       query_chunk: int | None = None) -> dict[str, float]:
    """mAP@topk per retrieval paradigm (DESIGN §3).

    codes = {"student": {"query": Q, "database": D}, "teacher": {...}}. SSHP: student queries against the
    student's database; ASHP: student queries against the teacher's database; "teacher": the teacher alone.
    A paradigm is computed when both of its codes are given.
    """
    paradigms = dict(PARADIGMS, teacher=TEACHER_PARADIGM)
    out = {}
    for name, (q_enc, db_enc) in paradigms.items():
        q, db = codes.get(q_enc, {}).get("query"), codes.get(db_enc, {}).get("database")
        if q is not None and db is not None:
            out[name] = mean_average_precision(q, db, query_labels, db_labels, topk, query_chunk=query_chunk)
    if not out:
        raise ValueError("evaluate_paradigms: no paradigm has both its query and database codes")
    return out


def encode_batches(model, batches: Iterable[dict], device, image_key: str = "image"
                   ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Encode every batch -> (±1 float32 codes (N, L), keys, labels (N,) or (N, C)), in batch order.

    `model` is a HashModel or a wrapper holding one in `.module` (DeepSpeed engine, DDP).
    """
    encode = model.encode if hasattr(model, "encode") else model.module.encode
    codes, keys, labels = [], [], []
    for batch in batches:
        codes.append(encode(batch[image_key].to(device)).float().cpu())
        keys.extend(str(k) for k in batch["key"])
        labels.append(torch.as_tensor(batch["label"]).cpu())
    if not codes:
        return np.zeros((0, 0), np.float32), [], np.zeros((0,), np.int64)
    return torch.cat(codes).numpy(), keys, torch.cat(labels).numpy()
