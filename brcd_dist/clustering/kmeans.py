"""Distributed Lloyd k-means over codes sharded across the ranks of a torch.distributed group (DESIGN §1 stage B).

The teacher's codes of the training split stay where they were computed: each rank assigns its own shard to the
nearest centroid, and only centroid-sized messages cross ranks (one all_reduce of float64 sums, counts and inertia
per iteration). Works with torch.distributed uninitialised (world size 1), with gloo on CPU and NCCL on GPU.

Exactness: sums and counts are float64, so the centroids equal those of one process on the rank-order concatenation
of the shards whenever the float64 sums are exact: always for ±1 codes (integer sums), and for float data up to
float64 rounding (the sum order differs; on a GPU index_add_'s atomics also vary it from run to run). The global
order of the points, which seeds the initialisation, is the
rank-order concatenation of the shards (rank 0's points first), found by an all_gather of the shard sizes.

Iteration t assigns every point to its nearest centroid of C_t (inertia J_t = Σ squared L2 distance, FAISS's
`obj[t]`), then moves the centroids to the means: C_{t+1}. After the last update one more assignment pass makes the
returned assignments those of the returned centroids, so `inertia` holds J_0..J_T (T = iterations).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from brcd_dist.clustering.assign import BACKENDS, CentroidAssigner, choose_backend
from brcd_dist.train import collectives

log = logging.getLogger(__name__)

INITS = ("k-means++", "random")
SPLIT_EPS = 1 / 1024  # FAISS split_clusters: relative perturbation that turns one centroid into two
_SUM_CHUNK = 1 << 16  # rows per block when summing, so that no float64 copy of the whole shard is made


@dataclass
class KMeansState:
    """Progress, as on_iteration sees it: the centroids at the start of iteration `iteration` (= updates done)."""

    centroids: np.ndarray  # (k, d) float32
    iteration: int = 0
    inertia: list[float] = field(default_factory=list)  # J_0..J_{iteration-1}
    n_splits: int = 0  # empty-cluster splits so far


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32, identical on every rank
    assignments: np.ndarray  # (n_local,) int64: nearest centroid of each local point (ties: lowest index)
    inertia: list[float]  # J_0..J_T: total squared L2 distance to the assigned centroid, all ranks, per iteration
    iterations: int  # T: centroid updates done, resumed ones included
    n_splits: int  # empty clusters refilled by splitting the largest one
    backend: str  # how this rank assigned its shard: one of BACKENDS


# ----------------------------------------------------------------------------- collectives


class _Comm:
    """The few collectives k-means needs, on the process group's device (train/collectives)."""

    def __init__(self, group):
        self.active = dist.is_available() and dist.is_initialized()
        if group is not None and not self.active:
            raise ValueError("distributed_kmeans: a group was given but torch.distributed is not initialised")
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.size = dist.get_world_size(group) if self.active else 1

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        return collectives.all_reduce(t, op=op, group=self.group)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(m,) on each rank -> (world, m) in rank order."""
        return collectives.all_gather(t, group=self.group)


# ----------------------------------------------------------------------------- input checks


def _validate(x, k: int, iters: int, seed: int, init, bad_arg: str, comm: _Comm) -> np.ndarray:
    """Check the inputs of all ranks together, so that every rank raises the same error instead of one rank
    leaving a collective that the others wait in. Returns the shard sizes of all ranks (rank order)."""
    shape = tuple(x.shape)
    ndim_ok = len(shape) == 2
    n, d = (shape[0], shape[1]) if ndim_ok else (0, 0)
    finite = bool(torch.isfinite(x).all()) if ndim_ok else True
    init_k, init_d = (init.shape if init.ndim == 2 else (-1, -1)) if init is not None else (k, d)
    mine = {
        "ndim": len(shape),
        "n": n,
        "d": d,
        "finite": int(finite),
        "k": k,
        "iters": iters,
        "seed": seed,
        "init_k": init_k,
        "init_d": init_d,
        "bad_arg": int(bool(bad_arg)),
    }
    table = comm.all_gather(torch.tensor(list(mine.values()), dtype=torch.int64)).numpy()  # (ranks, columns)
    col = dict(zip(mine, table.T))  # column name -> one value per rank
    ndims, ns, ds, fin, ks, its, seeds = (col[c] for c in ("ndim", "n", "d", "finite", "k", "iters", "seed"))
    init_shapes = np.stack([col["init_k"], col["init_d"]], axis=1)

    def fail(msg: str):
        raise ValueError(f"distributed_kmeans: {msg}")

    if col["bad_arg"].any():
        fail(bad_arg or f"bad argument on rank(s) {np.flatnonzero(col['bad_arg']).tolist()}")
    if (ndims != 2).any():
        fail(f"x must be 2-D (n, d) on every rank; ndim per rank: {ndims.tolist()}")
    for name, col in (("k", ks), ("iters", its), ("seed", seeds)):
        if (col != col[0]).any():
            fail(f"{name} differs between ranks: {col.tolist()}")
    if k < 2:
        fail(f"k={k}: need at least 2 clusters")
    if iters < 0:
        fail(f"iters={iters}: must be >= 0")
    if (ds != ds[0]).any() or ds[0] < 1:
        fail(
            "the dimension d must be the same (>= 1) on every rank, even a rank without data; "
            f"d per rank: {ds.tolist()}"
        )
    total = int(ns.sum())
    if k > total:
        fail(f"k={k} is larger than the number of points ({total} over {comm.size} ranks: {ns.tolist()})")
    if not fin.all():
        fail(f"x contains NaN or Inf on rank(s) {np.flatnonzero(fin == 0).tolist()}")
    if (init_shapes != [[k, ds[0]]]).any():
        fail(f"init centroids must have shape ({k}, {ds[0]}); per rank: {init_shapes.tolist()}")
    return ns


# ----------------------------------------------------------------------------- initialisation


def _fetch_point(x: torch.Tensor, local_index: int | None, comm: _Comm) -> torch.Tensor:
    """The point that one rank owns (local_index not None there), as float64 on every rank; exact (x + 0 = x)."""
    buf = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    if local_index is not None:
        buf += x[local_index].double()
    return comm.all_reduce(buf)


def _owner(global_index: int, offsets: np.ndarray) -> tuple[int, int]:
    """Global index in the rank-order concatenation -> (rank, local index)."""
    r = int(np.searchsorted(offsets, global_index, side="right") - 1)
    return r, global_index - int(offsets[r])


def _sq_dist_to(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exact per-row float64 ||x - c||²: elementwise, so a point's value does not depend on its shard."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], _SUM_CHUNK):
        out[s : s + _SUM_CHUNK] = ((x[s : s + _SUM_CHUNK].double() - c) ** 2).sum(dim=1)
    return out


def _init_random(x, k, rng, offsets, comm) -> np.ndarray:
    """k distinct points drawn uniformly from the global order (FAISS's default initialisation)."""
    picks = rng.choice(int(offsets[-1]), size=k, replace=False)
    lo, hi = int(offsets[comm.rank]), int(offsets[comm.rank + 1])
    buf = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    mine = np.flatnonzero((picks >= lo) & (picks < hi))
    if mine.size:
        buf[torch.as_tensor(mine, device=x.device)] = x[torch.as_tensor(picks[mine] - lo, device=x.device)].double()
    return comm.all_reduce(buf).cpu().numpy()


def _init_kmeanspp(x, k, rng, offsets, comm) -> np.ndarray:
    """k-means++ (Arthur & Vassilvitskii 2007), D²-weighted, over the global order.

    To draw the same points whatever the sharding, the weights are D² quantised to int64 against the global max
    (2^S levels, S as large as keeps the total below 2^62): integer sums are exact in any order, so one uniform
    integer from the shared RNG picks the same global index on one rank or many. Points with D² below
    max·2^-S get weight 0 (resolution 2^-S, S >= 29 for up to 2^33 points).
    """
    total = int(offsets[-1])
    scale = float(2 ** min(52, 62 - math.ceil(math.log2(total + 1))))
    out = np.empty((k, x.shape[1]), dtype=np.float64)
    r, i = _owner(int(rng.integers(total)), offsets)
    out[0] = _fetch_point(x, i if r == comm.rank else None, comm).cpu().numpy()
    d2 = _sq_dist_to(x, torch.as_tensor(out[0], device=x.device))
    for j in range(1, k):
        local_max = d2.max() if d2.numel() else torch.zeros((), dtype=torch.float64, device=x.device)
        m = float(comm.all_reduce(local_max.reshape(1), op=dist.ReduceOp.MAX))
        if m > 0:
            w = torch.floor(d2 / m * scale).to(torch.int64)
        else:  # fewer distinct points than k: every point is a centroid already, draw uniformly
            w = torch.ones_like(d2, dtype=torch.int64)
        cum = torch.cumsum(w, 0)
        w_ranks = comm.all_gather(cum[-1:].cpu() if cum.numel() else torch.zeros(1, dtype=torch.int64))[:, 0].numpy()
        u = int(rng.integers(int(w_ranks.sum())))
        starts = np.concatenate([[0], np.cumsum(w_ranks)])
        owner = int(np.searchsorted(starts, u, side="right") - 1)
        local = None
        if owner == comm.rank:
            local = int(torch.searchsorted(cum, torch.tensor([u - int(starts[owner])], device=cum.device), right=True))
        out[j] = _fetch_point(x, local, comm).cpu().numpy()
        d2 = torch.minimum(d2, _sq_dist_to(x, torch.as_tensor(out[j], device=x.device)))
    return out


# ----------------------------------------------------------------------------- update


def _local_stats(
    x: torch.Tensor, x_cols: np.ndarray | None, labels: torch.Tensor, dis: torch.Tensor, k: int, with_sums: bool
) -> torch.Tensor:
    """float64 [sums (k·d), counts (k), inertia (1)] of this rank's points (only [inertia] without sums).

    Sums run over the points in their local order. On the CPU numpy does the work on one thread: torch and FAISS
    bring two OpenMP runtimes, and alternating their thread pools every iteration stalled small torch ops 10-100x.
    There one bincount per dimension reads x_cols, a (d, n) copy of the shard made once: 3x faster than
    transposing blocks every iteration, at the cost of holding the shard twice.
    """
    n, d = x.shape
    if x_cols is None:
        local = [dis.double().sum().reshape(1)]
        if with_sums:
            sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
            for s in range(0, n, _SUM_CHUNK):
                sums.index_add_(0, labels[s : s + _SUM_CHUNK], x[s : s + _SUM_CHUNK].double())
            local = [sums.flatten(), torch.bincount(labels, minlength=k).double()] + local
        return torch.cat(local)
    lab = labels.numpy()
    inertia = np.array([dis.numpy().sum(dtype=np.float64)])
    if not with_sums:
        return torch.from_numpy(inertia)
    sums = np.stack([np.bincount(lab, weights=col, minlength=k) for col in x_cols], axis=1)
    counts = np.bincount(lab, minlength=k).astype(np.float64)
    return torch.from_numpy(np.concatenate([sums.ravel(), counts, inertia]))


def _update(sums: np.ndarray, counts: np.ndarray, old: np.ndarray, spherical: bool) -> tuple[np.ndarray, int]:
    """Means of the clusters; each empty cluster takes half of the currently largest one (FAISS split_clusters,
    but the largest cluster instead of a random pick, so every rank and every run makes the same choice)."""
    counts = counts.copy()
    c = old.astype(np.float64)
    full = counts > 0
    c[full] = sums[full] / counts[full, None]
    sign = np.where(np.arange(c.shape[1]) % 2 == 0, 1.0, -1.0)
    n_splits = 0
    for ci in np.flatnonzero(counts == 0):
        cj = int(np.argmax(counts))  # first index among the largest
        c[ci] = c[cj] * (1 + sign * SPLIT_EPS)
        c[cj] = c[cj] * (1 - sign * SPLIT_EPS)
        counts[ci] = counts[cj] / 2  # as FAISS: assume the cluster splits evenly
        counts[cj] -= counts[ci]
        n_splits += 1
    if spherical:
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return c.astype(np.float32), n_splits


# ----------------------------------------------------------------------------- the loop


def _converged(inertia: list[float], tol: float) -> bool:
    """Relative change of the inertia below tol (tol = 0: never)."""
    if len(inertia) < 2:
        return False
    prev, cur = inertia[-2], inertia[-1]
    change = abs(prev - cur) / prev if prev > 0 else 0.0
    return change < tol


def distributed_kmeans(
    x,
    k: int,
    *,
    iters: int = 25,
    tol: float = 1e-4,
    seed: int = 0,
    spherical: bool = False,
    group=None,
    on_iteration: Callable[[KMeansState], None] | None = None,
    init: str | np.ndarray = "k-means++",
    backend: str | None = None,
) -> KMeansResult:
    """Lloyd's k-means of the points of all ranks; call it on every rank of `group` with that rank's shard.

    x: (n_local, d) float32 numpy or torch (CPU or CUDA); a rank without data passes (0, d).
    iters: most centroid updates; stops earlier when |J_t - J_{t-1}| < tol · J_{t-1}.
    spherical: unit-norm centroids (FAISS's spherical k-means); on ±1 codes, whose norms are all √L, that is
        cosine (= Hamming) geometry. Inertia is still Σ||x - c||², which unit-norm means minimise.
    on_iteration(state): called on every rank after each update with a KMeansState (progress bars).
    init: "k-means++" (distributed, D²-weighted by squared L2 distance, also in spherical mode), "random" (k distinct
        points, uniform), or (k, d) centroids. Both draws use numpy's default_rng(seed) over the global order, so
        they do not depend on the number of ranks.
    backend: override choose_backend() (one of BACKENDS).
    """
    comm = _Comm(group)
    x = torch.as_tensor(x).to(torch.float32).contiguous()
    init_arr = np.asarray(init, dtype=np.float32) if not isinstance(init, str) else None
    backend = backend or choose_backend()
    bad_arg = (
        ""  # raised on every rank by _validate, so that a rank with a bad argument does not leave the others hanging
    )
    if isinstance(init, str) and init not in INITS:
        bad_arg = f"init={init!r}: allowed {', '.join(INITS)} or a (k, d) array"
    elif backend not in BACKENDS:
        bad_arg = f"backend={backend!r}: allowed {', '.join(BACKENDS)}"
    elif not tol >= 0:
        bad_arg = f"tol={tol}: must be >= 0"
    elif init_arr is not None and not np.isfinite(init_arr).all():
        bad_arg = "init centroids contain NaN or Inf"
    shard_sizes = _validate(x, k, iters, seed, init_arr, bad_arg, comm)
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)])

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend in ("faiss-gpu", "torch-cuda")
        else torch.device("cpu")
    )
    x = x.to(device)
    d = x.shape[1]
    log.info(
        "k-means: rank %d/%d assigns %d points (d=%d, k=%d) with %s", comm.rank, comm.size, x.shape[0], d, k, backend
    )
    assign = CentroidAssigner(backend, d, spherical, device)
    x_sq = _sq_dist_to(x, torch.zeros(d, dtype=torch.float64, device=device)) if spherical else None
    x_cols = np.ascontiguousarray(x.numpy().T) if device.type == "cpu" else None  # see _local_stats

    if init_arr is not None:
        c0 = init_arr.astype(np.float64)
    else:
        rng = np.random.default_rng(seed)
        c0 = (_init_kmeanspp if init == "k-means++" else _init_random)(x, k, rng, offsets, comm)
    if spherical:
        c0 /= np.maximum(np.linalg.norm(c0, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    centroids, t, inertia, n_splits = c0.astype(np.float32), 0, [], 0

    while True:
        labels, dis = assign(x, x_sq, centroids)
        packed = comm.all_reduce(_local_stats(x, x_cols, labels, dis, k, with_sums=t < iters))  # last: inertia only
        inertia.append(float(packed[-1]))
        log.debug("k-means iteration %d: inertia %.6g", t, inertia[-1])
        if t >= iters or _converged(inertia, tol):
            break
        packed = packed.cpu().numpy()
        centroids, splits = _update(packed[: k * d].reshape(k, d), packed[k * d : k * d + k], centroids, spherical)
        n_splits += splits
        t += 1
        if splits:
            log.info("k-means iteration %d: split %d empty cluster(s)", t, splits)
        if on_iteration is not None:
            on_iteration(KMeansState(centroids.copy(), t, list(inertia), n_splits))

    if comm.rank == 0:
        log.info(
            "k-means: %d iterations, inertia %.6g -> %.6g, %d empty-cluster splits",
            t,
            inertia[0],
            inertia[-1],
            n_splits,
        )
    return KMeansResult(
        centroids=centroids,
        assignments=labels.cpu().numpy(),
        inertia=inertia,
        iterations=t,
        n_splits=n_splits,
        backend=backend,
    )
