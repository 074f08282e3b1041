"""Stages B–D in bf16 against fp32 on the CPU: one fp32 run of the whole pipeline (its teacher trained in the run),
then stages B–D again with `train.precision=bf16` on that same teacher (loaded, cast to bf16), on a local Ray.
Prints one JSON row per seed (train.seed: the teacher's and the student's initialisation and data order): each test
mAP in both precisions, their differences, and each run's wall time; then the mean difference against the spread
of the fp32 mAPs over seeds (how far apart two fp32 runs land anyway).

    .venv/bin/python bench/precision.py --seeds 0 1 2 --epochs 10        # 4,000 images, 1,000 to train on
    .venv/bin/python bench/precision.py --max-images 400 --per-class 8   # a smoke

Fashion-MNIST from Debian's dataset-fashion-mnist; teacher resnet10t, student mobilenetv3_small_050, 64 bits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MAP_KEYS = ("test_query/sshp_map", "test_query/ashp_map", "test_query/teacher_map")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-images", type=int, default=4000, help="training and test images kept (default 4000)")
    p.add_argument("--per-class", type=int, default=100, help="training images per class (default 100)")
    p.add_argument("--epochs", type=int, default=5, help="student epochs (default 5)")
    p.add_argument("--teacher-epochs", type=int, default=2, help="teacher epochs on the train split (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values (default 0)")
    p.add_argument("--out", default="", help="append the JSON rows to this file")
    args = p.parse_args(argv)

    import ray

    from brcd_dist.config import load_config
    from brcd_dist.data import write_shards
    from brcd_dist.driver import absolute_paths, launch

    work = Path(tempfile.mkdtemp(prefix="brcd-precision-"))
    shards = work / "shards"
    write_shards(
        shards, "fashion_mnist", FASHION_MNIST, train_per_class=args.per_class, max_images=args.max_images,
        samples_per_shard=250, progress=False,
    )  # fmt: skip
    common = [
        "data.source=shards",
        f"data.shards_dir={shards}",
        "teacher.name=resnet10t",
        "student.name=mobilenetv3_small_050",
        f"train.teacher_epochs={args.teacher_epochs}",
        "train.teacher_split=train",
        f"train.epochs={args.epochs}",
        "train.eval_every=0",
        "tracking.enabled=false",
        f"train.storage_path={work / 'runs'}",
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for seed in args.seeds:
            row = {"seed": seed, "max_images": args.max_images, "per_class": args.per_class, "epochs": args.epochs}
            fp32_teacher = work / "runs" / f"fp32-{seed}" / "teacher.pt"
            runs = {}
            for precision, extra in (
                ("fp32", [f"train.name=fp32-{seed}"]),
                ("bf16", [f"train.name=bf16-{seed}", "train.precision=bf16", f"teacher.uri={fp32_teacher}"]),
            ):
                cfg = load_config(REPO / "configs" / "fashion_mnist.yaml", common + extra + [f"train.seed={seed}"])
                t0 = time.perf_counter()
                result = launch(absolute_paths(cfg))
                if result.error is not None:
                    raise result.error
                runs[precision] = {k: result.metrics[k] for k in MAP_KEYS}
                row[f"{precision}_seconds"] = round(time.perf_counter() - t0, 1)
            for key in MAP_KEYS:
                name = key.split("/")[1]
                row[f"fp32_{name}"], row[f"bf16_{name}"] = runs["fp32"][key], runs["bf16"][key]
                row[f"diff_{name}"] = round(runs["bf16"][key] - runs["fp32"][key], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        ray.shutdown()
    for key in MAP_KEYS:
        name = key.split("/")[1]
        diffs = [r[f"diff_{name}"] for r in rows]
        fp32 = [r[f"fp32_{name}"] for r in rows]
        print(
            f"{name}: bf16 − fp32 mean {statistics.mean(diffs):+.4f} (each {', '.join(f'{d:+.4f}' for d in diffs)}); "
            f"fp32 over seeds: {min(fp32):.4f}–{max(fp32):.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
