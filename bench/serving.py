"""Serving the student: (a) encoding a database with Ray Data (jobs/index.py, jobs/evaluate.py) against a bare
loop, (b) FAISS binary indexes (brcd_dist/index.py): recall@10 of IVF and HNSW against exact search, query
latency p50/p99, queries/s, build time and bytes, at the real database size and at 1M synthetic codes.

(a) Same model (the config's student, random init with its hash head centred on the data so that its codes
    spread out as a trained model's do), same images (a shard split), same threads T on each side:
    - bare: this process, torch.set_num_threads(T), the evaluation's one-process reader (eval_batches, no loader
      workers) and encode loop (retrieval.encode_batches): one process, no Ray.
    - ray: a local Ray instance with T CPUs, brcd_dist.batch_encoding.encode_images: T encoder actors of one
      thread each, each reading, decoding and encoding whole shards. Its time includes starting the actors
      (not ray.init), and the codes are checked equal to the bare loop's.
(b) Per size and kind: build seconds (FAISS add, plus k-means training for IVF), serialised bytes,
    recall@10 (brcd_dist.index.recall_at_k: share of the hits as near as the exact 10th neighbour) against
    IndexBinaryFlat, latency of one query at a time (p50/p99 over --latency-queries queries) and queries/s of
    one batch of --queries queries. FAISS runs on T threads. Real codes: the (a) student's codes of the
    database split, queried with its codes of test queries. Synthetic: codes around 10,000 random centres with
    12% of bits flipped (a neighbourhood structure; uniform random codes have no near neighbours to find).

    python bench/serving.py --shards data/fashion_mnist            # (a) and (b), 2 threads
    python bench/serving.py --shards data/fashion_mnist --skip-encode --sizes 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brcd_dist.codes import pack_codes
from brcd_dist.data import eval_batches, load_manifest
from brcd_dist.index import build_faiss, recall_at_k, search_faiss
from brcd_dist.models import HashModel
from brcd_dist.retrieval import encode_batches

KINDS = ("flat", "ivf", "hnsw")


def centred_student(arch: str, manifest, bits: int = 64) -> HashModel:
    torch.manual_seed(0)
    model = HashModel(arch, bits, in_chans=manifest.in_chans, img_size=32).eval()
    batch = next(
        iter(
            eval_batches(
                manifest,
                "train",
                rank=0,
                world_size=1,
                batch_size=256,
                num_workers=0,
                image_size=32,
                in_chans=manifest.in_chans,
            )
        )
    )
    with torch.no_grad():
        model.head.bias -= model.head(model.backbone(batch["image"])).mean(0)
    return model


def bare_encode(model, manifest, split: str, threads: int, batch_size: int):
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    batches = eval_batches(
        manifest,
        split,
        rank=0,
        world_size=1,
        batch_size=batch_size,
        num_workers=0,
        image_size=model.img_size,
        in_chans=model.in_chans,
    )
    codes, keys, _ = encode_batches(model, batches, "cpu")
    seconds = time.perf_counter() - t0
    order = np.argsort(np.array(keys), kind="stable")
    return pack_codes(codes[order]), np.array(keys)[order], seconds


def ray_encode(model, shards: str, split: str, threads: int, batch_size: int):
    import ray

    from brcd_dist.batch_encoding import encode_images, image_source

    tmp = tempfile.mkdtemp(prefix="brcd-b-")
    ray.init(num_cpus=threads, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        encoded = encode_images(model, image_source(shards, split), batch_size=batch_size, actors=threads)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return encoded.codes, encoded.keys, seconds


def synthetic_codes(n: int, seed: int, centres: int = 10_000, flip: float = 0.12, bits: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1234)  # the same centres for database and queries
    c = rng.integers(0, 2, (centres, bits), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    out = np.empty((n, bits // 8), np.uint8)
    for start in range(0, n, 100_000):  # in slices: 1M x 64 unpacked bits would be 64 MB of uint8 at once
        m = min(100_000, n - start)
        b = c[rng.integers(0, centres, m)] ^ (rng.random((m, bits)) < flip).astype(np.uint8)
        out[start : start + m] = np.packbits(b, axis=1)
    return out


def index_rows(name: str, db: np.ndarray, queries: np.ndarray, latency_queries: int, k: int = 10) -> list[dict]:
    import faiss

    rows, exact = [], None
    for kind in KINDS:
        t0 = time.perf_counter()
        index = build_faiss(db, kind)
        build_s = time.perf_counter() - t0
        nbytes = len(faiss.serialize_index_binary(index))
        # IVF: the default nprobe (nlist/16) and 4x it, on the same index
        for nprobe in [index.nprobe, min(index.nlist, 4 * index.nprobe)] if kind == "ivf" else [None]:
            if nprobe is not None:
                index.nprobe = nprobe
            search_faiss(index, queries[:10], k)  # warm-up
            lat = []
            for i in range(latency_queries):
                t = time.perf_counter()
                search_faiss(index, queries[i : i + 1], k)
                lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            dist, _ = search_faiss(index, queries, k)
            qps = len(queries) / (time.perf_counter() - t)
            if kind == "flat":
                exact = dist
            row = {
                "codes": name,
                "n": len(db),
                "kind": kind,
                "build_s": round(build_s, 3),
                "bytes": nbytes,
                "recall@10": round(recall_at_k(dist, exact), 4),
                "p50_ms": round(1e3 * np.percentile(lat, 50), 3),
                "p99_ms": round(1e3 * np.percentile(lat, 99), 3),
                "qps": round(qps, 1),
            }
            if kind == "ivf":
                row.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="shard directory (jobs/make_shards.py)")
    p.add_argument("--split", default="database")
    p.add_argument("--model", default="mobilenetv3_small_050")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000], help="synthetic database sizes")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--skip-encode", action="store_true", help="(b) only; real codes from the bare loop")
    p.add_argument("--json", default="", help="append the rows to this JSON-lines file")
    args = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    manifest = load_manifest(args.shards)
    model = centred_student(args.model, manifest)
    rows = []
    bare_codes, bare_keys, bare_s = bare_encode(model, manifest, args.split, args.threads, args.batch_size)
    n = len(bare_keys)
    if not args.skip_encode:
        ray_codes, ray_keys, ray_s = ray_encode(model, args.shards, args.split, args.threads, args.batch_size)
        assert np.array_equal(ray_keys, bare_keys) and np.array_equal(ray_codes, bare_codes), "codes differ"
        _, _, bare2_s = bare_encode(model, manifest, args.split, args.threads, args.batch_size)
        row = {
            "part": "encode",
            "model": args.model,
            "images": n,
            "threads": args.threads,
            "bare_img_s": round(n / bare_s, 1),
            "ray_data_img_s": round(n / ray_s, 1),
            "bare_after_img_s": round(n / bare2_s, 1),
            "ratio_ray_over_best_bare": round(min(bare_s, bare2_s) / ray_s, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    q_codes, _, _ = bare_encode(model, manifest, "test_query", args.threads, args.batch_size)
    q_codes = q_codes[: args.queries]
    rows += index_rows(f"student {args.split}", bare_codes, q_codes, args.latency_queries)
    for size in args.sizes:
        rows += index_rows(
            "synthetic", synthetic_codes(size, seed=1), synthetic_codes(args.queries, seed=2), args.latency_queries
        )
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
