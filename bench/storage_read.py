"""Benchmark: reading shards from a loopback S3-compatible store (SeaweedFS on 127.0.0.1) against local files,
as a ratio measured in one run.

    python bench/storage_read.py [--max-images 10000] [--samples-per-shard 1000] [--repeats 3]

Fashion-MNIST shards are written once to a local directory and uploaded to the store; then, interleaved
`--repeats` times, (1) the raw bytes of every shard through brcd_dist.storage.open_read (sha256 checked, as the
readers do), (2) every sample of the database split through eval_batches (tar parsing + PNG decode + resize, one
process, no loader workers), from the local copy and from s3://. Medians; the ratio is s3 / local throughput.
The store runs as a separate process on the same machine, so both sides share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test suite's SeaweedFS launcher

from object_store import start_seaweedfs  # noqa: E402 (after the sys.path line)

from brcd_dist import storage  # noqa: E402 (after the sys.path line)
from brcd_dist.data import eval_batches, load_manifest, write_shards  # noqa: E402 (after the sys.path line)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def read_bytes_all(manifest, base: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for name in manifest.shard_files():
        with storage.open_read(storage.join(base, name), sha256=manifest.sha256[name]) as f:
            while block := f.read(1 << 20):
                n += len(block)
    return n, time.perf_counter() - t0


def read_samples(manifest) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = sum(
        len(b["key"])
        for b in eval_batches(
            manifest, "database", rank=0, world_size=1, batch_size=256, num_workers=0, image_size=32, in_chans=1
        )
    )
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-images", type=int, default=10000)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    store = start_seaweedfs()
    os.environ.update(store.env)
    try:
        with tempfile.TemporaryDirectory(prefix="brcd-bench-") as local:
            write_shards(
                local,
                "fashion_mnist",
                FASHION_MNIST,
                max_images=args.max_images,
                train_per_class=args.max_images // 20,
                samples_per_shard=args.samples_per_shard,
                progress=False,
            )
            remote = store.url("bench")
            storage.copy_tree(local, remote)
            m_local, m_s3 = load_manifest(local), load_manifest(remote)
            rows = {"bytes_local": [], "bytes_s3": [], "samples_local": [], "samples_s3": []}
            total = n_samples = 0
            for _ in range(args.repeats):
                total, s = read_bytes_all(m_local, local)
                rows["bytes_local"].append(total / s)
                _, s = read_bytes_all(m_s3, remote)
                rows["bytes_s3"].append(total / s)
                n_samples, s = read_samples(m_local)
                rows["samples_local"].append(n_samples / s)
                _, s = read_samples(m_s3)
                rows["samples_s3"].append(n_samples / s)
    finally:
        store.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "shards": len(m_local.shard_files()),
        "bytes": total,
        "database_samples": n_samples,
        "raw_MBps_local": med["bytes_local"] / 1e6,
        "raw_MBps_s3": med["bytes_s3"] / 1e6,
        "raw_ratio_s3_over_local": med["bytes_s3"] / med["bytes_local"],
        "samples_per_s_local": med["samples_local"],
        "samples_per_s_s3": med["samples_s3"],
        "samples_ratio_s3_over_local": med["samples_s3"] / med["samples_local"],
        "raw_rows": rows,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
