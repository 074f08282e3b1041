"""Hash retrieval evaluation (DESIGN §3): Hamming ranking, mAP@K, precision@K, precision-recall by radius.

Ranking order is (Hamming distance, database index): ties go to the lower index, so mAP is reproducible
(the authors' code broke ties by an unstable argsort). Queries are processed in chunks sized so that one
chunk's distance matrix stays near `CHUNK_ELEMENTS` entries: a 1M-code database fits in memory.

Codes are ±1 (N, L) arrays or tensors, or packed (codes.pack_codes: uint8 (N, L/8) numpy), which the CPU ranks
without unpacking (a 1.28M-code database of 64 bits is 10 MB packed, 328 MB as float32).

Two exact ways to the same order:
- CPU: codes packed into 64-bit words, distances by XOR + popcount (uint8/uint16), then numpy's stable
  argsort, which for 8/16-bit integers is a counting (radix) sort, O(N) per query; row blocks run in threads
  (numpy releases the GIL). About 2.7x less CPU time than matmul + `torch.topk` (bench/retrieval.py).
- other devices (GPU): distances from a matmul of ±1 codes, `(L - a·b) / 2`, exact small integers, then
  `torch.topk` of the key `distance * N + index`, unique per item, so the top-k and its order are exact; the
  key is float32 while that is exact (<= 2^24) and float64 beyond.
FAISS's binary k-NN was not used: its order among equal distances is not specified.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import torch

from brcd_dist.codes import pack_codes, unpack_codes

PARADIGMS = {"sshp": ("student", "student"), "ashp": ("student", "teacher")}  # (query encoder, database encoder)
TEACHER_PARADIGM = ("teacher", "teacher")  # the teacher's own mAP, reported beside SSHP/ASHP
CHUNK_ELEMENTS = 1 << 24  # entries of one (queries x database) block
METHODS = ("auto", "popcount", "matmul")


def _is_packed(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2


def _bits(x) -> int:
    return 8 * x.shape[1] if _is_packed(x) else torch.as_tensor(x).shape[1]


def _codes(x, name: str) -> torch.Tensor:
    if _is_packed(x):
        return torch.from_numpy(unpack_codes(x, 8 * x.shape[1]))
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected (N, bits) ±1 codes, got shape {tuple(t.shape)}")
    t = t.float()
    if t.numel() and not bool((t.abs() == 1).all()):
        raise ValueError(f"{name}: codes must be ±1 (pack/unpack with brcd_dist.codes)")
    return t


def _labels(x, n: int, name: str) -> np.ndarray:
    a = x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if a.ndim not in (1, 2) or a.shape[0] != n:
        raise ValueError(f"{name}: expected ({n},) int labels or ({n}, C) multi-hot, got shape {a.shape}")
    return a.astype(np.float32) if a.ndim == 2 else a  # multi-hot: relevance is a label-matrix product


def _query_chunk(n_db: int, query_chunk: int | None) -> int:
    return query_chunk or max(1, CHUNK_ELEMENTS // max(n_db, 1))


def _distance_dtype(bits: int):
    return np.uint8 if bits <= 255 else np.uint16


def pack_words(codes) -> np.ndarray:
    """±1 or packed codes (N, L) -> uint64 words (N, ceil(L / 64)); zero padding adds nothing to an XOR popcount."""
    packed = codes if _is_packed(codes) else pack_codes(codes)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def hamming_distances_packed(q_words: np.ndarray, db_words: np.ndarray, bits: int) -> np.ndarray:
    """(c, N) Hamming distances of packed codes, uint8 (L <= 255) or uint16: XOR + popcount per word."""
    if q_words.shape[1] == 1:  # up to 64 bits: one popcount, already uint8, no running sum
        return np.bitwise_count(q_words[:, None, 0] ^ db_words[None, :, 0])
    dist = np.zeros((len(q_words), len(db_words)), _distance_dtype(bits))
    for w in range(q_words.shape[1]):
        dist += np.bitwise_count(q_words[:, None, w] ^ db_words[None, :, w])
    return dist


def stable_topk_by_sort(dist: np.ndarray, k: int) -> np.ndarray:
    """(c, k) indices of each row's k smallest distances, ties by lower index (CPU): a stable argsort's first k.

    `dist`: 8- or 16-bit integer distances. A row's histogram gives the k-th smallest distance; only the items at
    or below it (in index order) are sorted, stably: a stable sort's order, without sorting the whole row.
    """
    out = np.empty((len(dist), k), np.int64)
    for i, row in enumerate(dist):
        kth = int(np.searchsorted(np.cumsum(np.bincount(row)), k))  # the smallest distance with >= k at or below
        near = np.flatnonzero(row <= kth)
        out[i] = near[np.argsort(row[near], kind="stable")[:k]]
    return out


def stable_topk_by_key(dist: torch.Tensor, k: int, max_distance: int | None = None) -> torch.Tensor:
    """Same order as `stable_topk_by_sort`, by `topk` of the unique key distance * N + index (any device)."""
    n = dist.shape[1]
    top = int(dist.max()) if max_distance is None else max_distance
    key_dtype = torch.float32 if (top + 1) * n <= (1 << 24) else torch.float64
    key = dist.to(key_dtype, copy=True).mul_(n).add_(torch.arange(n, device=dist.device, dtype=key_dtype))
    return key.topk(k, dim=1, largest=False, sorted=True).indices


def _chunks(
    query_codes, db_codes, k: int | None, query_chunk: int | None, method: str = "auto"
) -> Iterator[tuple[int, np.ndarray]]:
    """Per query chunk: (start, top-k indices (c, k) in (distance, index) order), or with k=None
    (start, distances (c, N) uint8/uint16).

    method: "popcount" (CPU), "matmul" (any device), "auto": popcount on the CPU, matmul elsewhere.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed: {', '.join(METHODS)}")
    # Work where the query codes are (a GPU tensor stays on the GPU); numpy input runs on the CPU.
    device = query_codes.device if torch.is_tensor(query_codes) else torch.device("cpu")
    if _bits(query_codes) != _bits(db_codes):
        raise ValueError(f"query codes have {_bits(query_codes)} bits, database codes {_bits(db_codes)}")
    n, bits = len(db_codes), _bits(db_codes)
    step = _query_chunk(n, query_chunk)
    if method == "popcount" or (method == "auto" and device.type == "cpu"):
        q_words = pack_words(query_codes if _is_packed(query_codes) else _codes(query_codes, "query_codes"))
        db_words = pack_words(db_codes if _is_packed(db_codes) else _codes(db_codes, "db_codes"))

        def block(rows: np.ndarray) -> np.ndarray:
            dist = hamming_distances_packed(rows, db_words, bits)
            return dist if k is None else stable_topk_by_sort(dist, k)

        workers = max(1, torch.get_num_threads())
        with ThreadPoolExecutor(workers) as pool:  # row blocks of one chunk in parallel: memory stays one chunk
            for start in range(0, len(q_words), step):
                rows = q_words[start : start + step]
                yield start, np.concatenate(list(pool.map(block, np.array_split(rows, min(workers, len(rows))))))
        return
    q, db = _codes(query_codes, "query_codes").to(device), _codes(db_codes, "db_codes").to(device)
    db_t = db.T  # a transposed view: BLAS reads it in place
    for start in range(0, len(q), step):
        dist = torch.addmm(torch.tensor(bits / 2, device=device), q[start : start + step], db_t, alpha=-0.5)
        if k is None:
            yield start, dist.cpu().numpy().astype(_distance_dtype(bits))
        else:
            yield start, stable_topk_by_key(dist, k, bits).cpu().numpy()


def _check_k(k: int, n_db: int) -> int:
    if k < 1:
        raise ValueError(f"topk={k}: must be >= 1")
    if n_db < 1:
        raise ValueError("the database is empty")
    return min(int(k), n_db)  # K beyond the database ranks everything (mAP@all)


def hamming_topk(query_codes, db_codes, k: int, *, query_chunk: int | None = None, method: str = "auto") -> np.ndarray:
    """np.int64 (Q, k) database indices by increasing Hamming distance, ties broken by lower index."""
    k = _check_k(k, len(db_codes))
    tops = [top for _, top in _chunks(query_codes, db_codes, k, query_chunk, method)]
    return np.concatenate(tops).astype(np.int64)


def _relevance(q_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """(c, N) bool: does database item j share a label with query i (int labels, or multi-hot: any class)."""
    if q_labels.ndim == 1:
        return db_labels[None, :] == q_labels[:, None]
    return (q_labels @ db_labels.T) > 0


def _checked_labels(query_labels, db_labels, n_query: int, n_db: int) -> tuple[np.ndarray, np.ndarray]:
    ql = _labels(query_labels, n_query, "query_labels")
    dl = _labels(db_labels, n_db, "db_labels")
    if ql.ndim != dl.ndim:
        raise ValueError("query_labels and db_labels must both be int labels or both multi-hot")
    return ql, dl


def _ranked_relevance(query_codes, db_codes, query_labels, db_labels, topk: int, query_chunk: int | None, method: str):
    """Yield (c, k) bool relevance of each query chunk's ranked top-k list."""
    k = _check_k(topk, len(db_codes))
    ql, dl = _checked_labels(query_labels, db_labels, len(query_codes), len(db_codes))
    for start, top in _chunks(query_codes, db_codes, k, query_chunk, method):
        q = ql[start : start + len(top)]
        if q.ndim == 1:  # compare the k retrieved labels only
            yield dl[top] == q[:, None]
        else:
            yield np.take_along_axis(_relevance(q, dl), top, axis=1)


def average_precision_at_k(relevant: np.ndarray) -> np.ndarray:
    """AP@K per row of a ranked (Q, K) bool relevance matrix.

    DeepHash convention: mean of precision@i over the ranks i in the top K that hold a relevant item, i.e.
    divided by the number of relevant items retrieved in the top K (not by all relevant items in the
    database); a query with no relevant item in its top K scores 0 (DESIGN §3).
    """
    rel = np.asarray(relevant, dtype=bool)
    hits = np.cumsum(rel, axis=1)
    n_hit = rel.sum(1)
    precision_sum = (hits / np.arange(1, rel.shape[1] + 1) * rel).sum(1)
    return np.where(n_hit > 0, precision_sum / np.maximum(n_hit, 1), 0.0)


def average_precisions(
    query_codes, db_codes, query_labels, db_labels, topk: int, *, query_chunk: int | None = None, method: str = "auto"
) -> np.ndarray:
    """AP@topk of each query by Hamming ranking, in query order (float64). A query's AP depends on that query and
    the database alone, so queries can be ranked on different ranks and their APs put together in query order."""
    aps = [
        average_precision_at_k(rel)
        for rel in _ranked_relevance(query_codes, db_codes, query_labels, db_labels, topk, query_chunk, method)
    ]
    return np.concatenate(aps).astype(np.float64) if aps else np.zeros(0, np.float64)


def mean_average_precision(
    query_codes, db_codes, query_labels, db_labels, topk: int, *, query_chunk: int | None = None, method: str = "auto"
) -> float:
    """mAP@topk by Hamming ranking; relevant = shares a label (see `average_precision_at_k`)."""
    aps = average_precisions(
        query_codes, db_codes, query_labels, db_labels, topk, query_chunk=query_chunk, method=method
    )
    return float(aps.mean()) if len(aps) else 0.0


def precision_at_k(
    query_codes, db_codes, query_labels, db_labels, k: int, *, query_chunk: int | None = None, method: str = "auto"
) -> float:
    """Mean over queries of (relevant items among the first k ranked) / k."""
    precs = [
        rel.mean(1) for rel in _ranked_relevance(query_codes, db_codes, query_labels, db_labels, k, query_chunk, method)
    ]
    return float(np.concatenate(precs).mean()) if precs else 0.0


def pr_curve(
    query_codes, db_codes, query_labels, db_labels, *, query_chunk: int | None = None, method: str = "auto"
) -> dict:
    """Precision and recall of Hamming-ball retrieval at each radius r = 0..L.

    Retrieved at r = database items within distance <= r. Per query: precision = relevant retrieved /
    retrieved, recall = relevant retrieved / relevant in the database; each is averaged over the queries
    for which it is defined (precision: >= 1 item retrieved, recall: >= 1 relevant item), and is NaN at a
    radius where no query defines it. Returns {"radius", "precision", "recall"} as numpy arrays of L + 1.
    """
    return pr_from_sums(pr_sums(query_codes, db_codes, query_labels, db_labels, query_chunk=query_chunk, method=method))


def pr_from_sums(sums: np.ndarray) -> dict:
    """pr_curve from `pr_sums` (summed over any split of the queries: the sums add up)."""
    prec_sum, prec_n, rec_sum, rec_n = sums
    bits = len(prec_sum) - 1
    precision = np.where(prec_n > 0, prec_sum / np.maximum(prec_n, 1), np.nan)
    recall = rec_sum / rec_n[0] if rec_n[0] else np.full(bits + 1, np.nan)
    return {"radius": np.arange(bits + 1), "precision": precision, "recall": recall}


def pr_sums(
    query_codes, db_codes, query_labels, db_labels, *, query_chunk: int | None = None, method: str = "auto"
) -> np.ndarray:
    """(4, L + 1) float64: per radius, the sum of the queries' precisions and how many define one, the sum of
    their recalls and (in every column) how many define one. Sums over parts of the queries add up to the sums over
    all of them, so ranks can each take a part."""
    bits = _bits(db_codes)
    _check_k(1, len(db_codes))
    ql, dl = _checked_labels(query_labels, db_labels, len(query_codes), len(db_codes))
    prec_sum, prec_n, rec_sum, rec_n = np.zeros(bits + 1), np.zeros(bits + 1), np.zeros(bits + 1), 0
    for start, dist in _chunks(query_codes, db_codes, None, query_chunk, method):
        c = len(dist)
        rel = _relevance(ql[start : start + c], dl)
        # per-row histograms over radii (one bincount with row offsets), then counts "within distance <= r"
        cell = (np.arange(c)[:, None] * (bits + 1) + dist).ravel()
        retrieved = np.bincount(cell, minlength=c * (bits + 1)).reshape(c, bits + 1).cumsum(1)
        hits = np.bincount(cell[rel.ravel()], minlength=c * (bits + 1)).reshape(c, bits + 1).cumsum(1)
        prec_sum += np.where(retrieved > 0, hits / np.maximum(retrieved, 1), 0.0).sum(0)
        prec_n += (retrieved > 0).sum(0)
        has_rel = hits[:, -1] > 0  # relevant items in the whole database
        rec_sum += (hits[has_rel] / hits[has_rel, -1:]).sum(0)
        rec_n += int(has_rel.sum())
    return np.stack([prec_sum, prec_n, rec_sum, np.full(bits + 1, float(rec_n))])


def evaluate_paradigms(
    codes: dict, query_labels, db_labels, topk: int, *, query_chunk: int | None = None
) -> dict[str, float]:
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


def encode_batches(
    model, batches: Iterable[dict], device, image_key: str = "image"
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
