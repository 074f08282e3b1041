"""Benchmark: distributed_kmeans on W workers vs faiss.Kmeans in one process, same data, init and iterations.

    python bench/kmeans.py                 # CPU: 200k x 64, k=1,000, 20 iterations, 2 gloo workers
    python bench/kmeans.py --gpu           # GPU: 1M x 256, k=20,000, 25 iterations, data on the GPU(s)

Both sides get the same cores: FAISS runs with all threads, each worker with threads/W. Both produce the same
output: centroids after `iters` updates and the nearest-centroid label of every point, so the FAISS time is
train() plus one index.search() (the workers' loop ends with that assignment pass); train() alone is shown too.
The two run interleaved in the same processes (rank 0 runs FAISS while the other ranks wait in a barrier), so a
busy shared machine slows both alike. Times are wall-clock medians over --repeats; a worker run is timed on rank 0
from a barrier before to a barrier after, i.e. the slowest rank. Goal: ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brcd_dist.clustering.kmeans import distributed_kmeans  # noqa: E402


def make_data(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A mixture of k Gaussians (unit noise, centres spread 3 apart per coordinate); init: one point of each
    component (a random point for a component that drew none), so that few clusters empty and FAISS's random
    split, which our deterministic one cannot match, comes late."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d)).astype(np.float32)
    comp = rng.integers(k, size=n)
    x = centres[comp]
    x += rng.standard_normal(size=(n, d), dtype=np.float32)
    first = np.full(k, -1)
    order = rng.permutation(n)
    first[comp[order[::-1]]] = order[::-1]  # the last write wins: the first point of each component in `order`
    missing = first < 0
    first[missing] = rng.choice(n, size=int(missing.sum()), replace=False)
    return x, x[first].copy()


def faiss_reference(x: np.ndarray, init: np.ndarray, iters: int, gpu: bool) -> dict:
    import faiss

    n, d = x.shape
    # no subsampling (the same points as the workers), no early stop (FAISS >= 1.13 stops on an unchanged objective)
    no_stop = {"early_stop_threshold": -1.0} if hasattr(faiss.ClusteringParameters(), "early_stop_threshold") else {}
    km = faiss.Kmeans(
        d, init.shape[0], niter=iters, max_points_per_centroid=n, min_points_per_centroid=1, gpu=gpu, **no_stop
    )
    t0 = time.perf_counter()
    km.train(x, init_centroids=init)
    t1 = time.perf_counter()
    _, labels = km.index.search(x, 1)
    t2 = time.perf_counter()
    return {
        "train_s": t1 - t0,
        "train_assign_s": t2 - t0,
        "obj": [float(v) for v in km.obj],
        "nsplit": [int(s["nsplit"]) for s in km.iteration_stats],
        "labels": labels[:, 0],
    }


def _set_threads(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def worker(rank: int, args, port: int, data_dir: str) -> None:
    w = args.workers
    backend = args.backend
    if args.gpu:
        torch.cuda.set_device(rank % torch.cuda.device_count())  # several workers may share one GPU (gloo)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=w, timeout=timedelta(minutes=30)
    )
    x_all = np.load(Path(data_dir) / "x.npy", mmap_mode="r")
    init = np.load(Path(data_dir) / "init.npy")
    n = x_all.shape[0]
    lo, hi = n * rank // w, n * (rank + 1) // w
    shard = torch.from_numpy(np.array(x_all[lo:hi]))
    if args.gpu:
        shard = shard.cuda()
    per_rank = max(1, args.threads // w)
    x_ref = np.array(x_all) if rank == 0 and not args.skip_reference else None
    ref_runs, ours_runs, res = [], [], None
    splits = []  # cumulative splits after each update: the first split ends the window where FAISS must agree
    for _ in range(args.repeats):
        splits.clear()
        if x_ref is not None:
            import faiss

            _set_threads(args.threads)
            ref_runs.append(faiss_reference(x_ref, init, args.iters, gpu=args.gpu and faiss.get_num_gpus() > 0))
        _set_threads(per_rank)
        dist.barrier()
        t0 = time.perf_counter()
        res = distributed_kmeans(
            shard,
            init.shape[0],
            iters=args.iters,
            tol=0.0,
            init=init,
            on_iteration=lambda st: splits.append(st.n_splits),
        )
        dist.barrier()
        ours_runs.append(time.perf_counter() - t0)
    labels = [torch.zeros(0)] * w
    dist.all_gather_object(labels, res.assignments)
    if rank == 0:
        out = {
            "ours_s": ours_runs,
            "backend": res.backend,
            "inertia": res.inertia,
            "n_splits": res.n_splits,
            "nsplit": np.diff([0] + splits).tolist(),
        }
        if ref_runs:
            ref = ref_runs[-1]
            same = np.concatenate(labels) == ref["labels"]
            out.update(
                faiss_train_s=[r["train_s"] for r in ref_runs],
                faiss_train_assign_s=[r["train_assign_s"] for r in ref_runs],
                faiss_obj=ref["obj"],
                faiss_nsplit=ref["nsplit"],
                label_agreement=float(same.mean()),
            )
        (Path(data_dir) / "result.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--gpu", action="store_true", help="GPU case: 1M x 256, k=20,000, 25 iterations (sizes can be overridden)"
    )
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--backend", choices=("gloo", "nccl"), help="default: gloo on CPU; nccl when there is a GPU per worker"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="CPU threads in all (FAISS: all; each worker: threads/workers)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true", help="time the workers only")
    args = p.parse_args()
    n, d, k, iters = (1_000_000, 256, 20_000, 25) if args.gpu else (200_000, 64, 1_000, 20)
    args.n, args.d, args.k, args.iters = args.n or n, args.d or d, args.k or k, args.iters or iters
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device")
    if args.backend is None:
        args.backend = "nccl" if args.gpu and torch.cuda.device_count() >= args.workers else "gloo"
    if args.gpu and not args.skip_reference:
        import faiss

        if faiss.get_num_gpus() == 0:
            print(
                "warning: FAISS has no GPU support here; the workers assign with torch on the GPU while the FAISS "
                "reference runs on the CPU (slow at this size: consider --skip-reference or smaller --n/--k)"
            )

    x, init = make_data(args.n, args.d, args.k, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        np.save(Path(tmp) / "init.npy", init)
        del x
        port = _free_port()
        t0 = time.perf_counter()
        mp.spawn(worker, args=(args, port, tmp), nprocs=args.workers, join=True)
        wall = time.perf_counter() - t0
        out = json.loads((Path(tmp) / "result.json").read_text())
    report(args, out, wall)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(args, out: dict, wall: float) -> None:
    med = lambda v: float(np.median(v))  # noqa: E731
    case = f"{args.n:,} x {args.d}, k={args.k:,}, {args.iters} iters"
    ours = med(out["ours_s"])
    print(
        f"\n{case}; {args.workers} {args.backend} workers x {max(1, args.threads // args.workers)} threads "
        f"(assignment: {out['backend']}) vs FAISS with {args.threads} threads; medians of {args.repeats} "
        f"(whole run {wall:.0f} s, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    if "faiss_train_s" not in out:
        print(f"| workers (s) |\n|---|\n| {ours:.2f} |")
        return
    ft, fta = med(out["faiss_train_s"]), med(out["faiss_train_assign_s"])
    print(
        "| case | FAISS train (s) | FAISS train + assign (s) | workers (s) | ratio workers / (train + assign) "
        "| ratio workers / train |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| {case} | {ft:.2f} | {fta:.2f} | {ours:.2f} | {ours / fta:.2f} | {ours / ft:.2f} |")
    # J_t agrees until the update of iteration t splits a cluster on either side (FAISS splits at random)
    split_at = [i for i, (a, b) in enumerate(zip(out["nsplit"], out["faiss_nsplit"])) if a or b]
    upto = split_at[0] + 1 if split_at else args.iters
    rel = np.abs(np.array(out["inertia"][:upto]) / np.array(out["faiss_obj"][:upto]) - 1)
    print(
        f"agreement: max relative inertia difference over the first {upto} iterations (until the first split) "
        f"{rel.max():.1e}; same final labels for {100 * out['label_agreement']:.2f}% of points; "
        f"splits ours {out['n_splits']}, FAISS {sum(out['faiss_nsplit'])}"
    )
    print(
        "runs (s): workers "
        + ", ".join(f"{v:.2f}" for v in out["ours_s"])
        + "; FAISS train+assign "
        + ", ".join(f"{v:.2f}" for v in out["faiss_train_assign_s"])
    )


if __name__ == "__main__":
    main()
