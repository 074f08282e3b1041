"""mAP@K timing: brcd_dist.retrieval vs a straightforward numpy implementation, same codes and labels.

numpy baseline (DeepHash-style): per query chunk, the full float distance matrix 0.5 * (L - q @ db.T),
np.argsort(kind="stable") of each row, the first K. A second numpy row sorts uint8 distances instead, for
which numpy's stable sort is a radix sort. Ours runs twice: the CPU path (default on the CPU) and the path
used on other devices (method="matmul"). Every implementation must give the same mAP (checked).

    python bench/retrieval.py                      # 5k x 60k x 64 bits, then 1k x 1M x 64 bits
    python bench/retrieval.py --big-queries 5000   # the 1M database with 5k queries
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from brcd_dist.retrieval import CHUNK_ELEMENTS, mean_average_precision


def make_data(n_query: int, n_db: int, bits: int, classes: int = 10, flip: float = 0.25, seed: int = 0):
    """Codes clustered by class (class prototype with each bit flipped with probability `flip`): realistic ties."""
    rng = np.random.default_rng(seed)
    protos = rng.choice([-1.0, 1.0], size=(classes, bits)).astype(np.float32)

    def draw(n):
        labels = rng.integers(0, classes, n)
        flips = np.where(rng.random((n, bits)) < flip, -1.0, 1.0).astype(np.float32)
        return protos[labels] * flips, labels

    (q, ql), (db, dl) = draw(n_query), draw(n_db)
    return q, db, ql, dl


def numpy_map(q, db, ql, dl, topk: int, radix: bool = False) -> float:
    bits, n_db = q.shape[1], db.shape[0]
    step = max(1, CHUNK_ELEMENTS // n_db)  # same memory budget as ours: a 1M database must fit
    ranks = np.arange(1, topk + 1)
    aps = []
    for s in range(0, len(q), step):
        dist = 0.5 * (bits - q[s : s + step] @ db.T)
        if radix:
            dist = dist.astype(np.uint8 if bits < 256 else np.uint16)
        order = np.argsort(dist, axis=1, kind="stable")[:, :topk]
        rel = dl[order] == ql[s : s + step, None]
        hits = rel.cumsum(1)
        n_hit = rel.sum(1)
        aps.append(np.where(n_hit > 0, (hits / ranks * rel).sum(1) / np.maximum(n_hit, 1), 0.0))
    return float(np.concatenate(aps).mean())


def timed(fn, repeats: int):
    """Median wall seconds, median process CPU seconds (all threads; less sensitive to a busy machine), result."""
    walls, cpus, value = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), value


def run_case(n_query, n_db, bits, topk, repeats, rows):
    q, db, ql, dl = make_data(n_query, n_db, bits)
    impls = [
        (
            "brcd_dist.retrieval, CPU path: popcount + counting sort in threads",
            lambda: mean_average_precision(q, db, ql, dl, topk),
        ),
        (
            "brcd_dist.retrieval, GPU path run on the CPU: matmul + torch.topk of distance*N+index",
            lambda: mean_average_precision(q, db, ql, dl, topk, method="matmul"),
        ),
        ("numpy: float distances + argsort(stable)", lambda: numpy_map(q, db, ql, dl, topk)),
        ("numpy: uint8 distances + argsort(stable) (radix)", lambda: numpy_map(q, db, ql, dl, topk, radix=True)),
    ]
    case = f"{n_query:,} x {n_db:,} x {bits} bits, mAP@{topk}"
    results = [(name, *timed(fn, repeats)) for name, fn in impls]
    ours = results[0]
    for name, wall, cpu, m in results:
        assert abs(m - ours[3]) < 1e-12, (name, m, ours[3])  # same ranking, same mAP
        rows.append((case, name, wall, wall / ours[1], cpu, cpu / ours[2], m))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--db", type=int, default=60_000)
    ap.add_argument("--big-queries", type=int, default=1000)
    ap.add_argument("--big-db", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--topk", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-repeats", type=int, default=1)
    args = ap.parse_args()
    rows: list = []
    run_case(200, 2000, args.bits, 100, 1, [])  # warm-up: torch/BLAS initialisation is not the method's cost
    run_case(args.queries, args.db, args.bits, args.topk, args.repeats, rows)
    if args.big_db:
        run_case(args.big_queries, args.big_db, args.bits, args.topk, args.big_repeats, rows)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
        f"median of {args.repeats} runs ({args.big_repeats} for the big database)\n"
    )
    print("| case | implementation | wall s | wall / ours | CPU s | CPU / ours | mAP |")
    print("|---|---|---|---|---|---|---|")
    for case, impl, wall, wall_ratio, cpu, cpu_ratio, m in rows:
        print(f"| {case} | {impl} | {wall:.2f} | {wall_ratio:.2f}x | {cpu:.2f} | {cpu_ratio:.2f}x | {m:.4f} |")


if __name__ == "__main__":
    main()
