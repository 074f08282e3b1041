"""Classic hashing on Fashion-MNIST pixels: ITQ, PCA-sign, LSH, with the DESIGN §3 protocol.

Fit on the training subset (500 per class, the seeded split of brcd_dist.data.splits, the same images as the
shards' "train" split), encode the database (all 60k training images) and the 5k test queries, mAP@1000 by
brcd_dist.retrieval. Pixels are the raw 28x28 IDX bytes / 255, flattened (784-d). When the shards' manifest is
there, its keys are checked against the indices used here.

    python bench/itq.py                       # 16, 32, 64 bits
    python bench/itq.py --bits 64 --iters 50
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from brcd_dist.config import load_config
from brcd_dist.data import load_manifest
from brcd_dist.data.idx import load_fashion_mnist
from brcd_dist.data.splits import make_splits
from brcd_dist.itq import fit_itq, fit_lsh, fit_pca_sign, itq_encode
from brcd_dist.retrieval import mean_average_precision

REFERENCE_ITQ = {16: 0.624, 32: 0.661, 64: 0.692}  # an independent earlier measurement at seed 0


def split_pixels(cfg):
    d = cfg.data
    arrays = load_fashion_mnist(d.source_path)
    s = make_splits(
        arrays["train_labels"],
        len(arrays["test_labels"]),
        train_per_class=d.train_per_class,
        val_fraction=d.val_fraction,
        seed=d.split_seed,
    )
    manifest_file = Path(d.shards_dir) / "manifest.json"
    if manifest_file.is_file():  # the same images as the shards the deep models train and are evaluated on
        m = load_manifest(d.shards_dir)
        for split, prefix in (("train", "train"), ("database", "train"), ("test_query", "test")):
            keys = [f"{prefix}-{i:05d}" for i in s[split]]
            assert sorted(keys) == sorted(m.splits[split].keys), f"split {split} differs from the manifest's"
        print(f"splits checked against {manifest_file}")
    pixels = lambda part, idx: arrays[f"{part}_images"][idx].reshape(len(idx), -1) / 255.0  # noqa: E731
    return {
        "train": pixels("train", s["train"]),
        "database": (pixels("train", s["database"]), arrays["train_labels"][s["database"]]),
        "test_query": (pixels("test", s["test_query"]), arrays["test_labels"][s["test_query"]]),
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, validate=False)
    data = split_pixels(cfg)
    (db_x, db_y), (q_x, q_y) = data["database"], data["test_query"]
    print(
        f"fit on {len(data['train'])} training images; {len(q_x)} queries x {len(db_x)} database; mAP@{cfg.eval.topk}"
    )
    methods = {
        "ITQ": lambda b: fit_itq(data["train"], b, iters=args.iters, seed=args.seed),
        "PCA-sign": lambda b: fit_pca_sign(data["train"], b),
        "LSH": lambda b: fit_lsh(data["train"], b, seed=args.seed),
    }
    rows = []
    for name, fit in methods.items():
        for bits in args.bits:
            t0 = time.perf_counter()
            model = fit(bits)
            score = mean_average_precision(itq_encode(model, q_x), itq_encode(model, db_x), q_y, db_y, cfg.eval.topk)
            rows.append({"method": name, "bits": bits, "map": score, "seconds": time.perf_counter() - t0})
            print(f"{name} {bits} bits: mAP {score:.4f} ({rows[-1]['seconds']:.1f} s)", flush=True)
    print()
    print("| method | " + " | ".join(f"{b} bits" for b in args.bits) + " |")
    print("|---|" + "---|" * len(args.bits))
    for name in methods:
        cells = [f"{r['map']:.3f}" for b in args.bits for r in rows if r["method"] == name and r["bits"] == b]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "| ITQ, reference (an earlier measurement) | "
        + " | ".join(f"{REFERENCE_ITQ.get(b, float('nan')):.3f}" for b in args.bits)
        + " |"
    )
    return rows


if __name__ == "__main__":
    main()
