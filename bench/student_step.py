"""Stage C's training rate per worker (the pipeline: reader, student step, the host reading the losses, MLflow step
metrics sent to a tracking server, checkpoints) against the bare student step, for one or more checkouts of the
project side by side: each round runs jobs/distill.py of every checkout in turn on the same shards, the same kept
teacher and the same MLflow server on 127.0.0.1, then times the bare step once. Prints one JSON row per run and a
table of medians (pipeline images/s per worker, bare images/s, their ratio) per checkout.

    .venv/bin/python bench/student_step.py --trees OLD . --rounds 3   # OLD: a checkout of an earlier commit

A checkout's code is what its runs import (PYTHONPATH=CHECKOUT; the Ray workers inherit it). The bare step is this
checkout's `student_step` with a plain AdamW on random views, one thread (a worker's share), batch 64.
Fashion-MNIST from Debian's dataset-fashion-mnist; teacher resnet10t, student mobilenetv3_small_050, 64 bits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def start_mlflow(work: Path) -> tuple[subprocess.Popen, str]:
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
         "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the MLflow server did not answer in 60 s")


def distill(tree: Path, overrides: list[str], work: Path) -> dict:
    """jobs/distill.py of `tree`, importing `tree`'s package; returns the run's state.json."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(tree / "jobs" / "distill.py"), "--config", str(tree / "configs" / "fashion_mnist.yaml")]
    proc = subprocess.run(cmd + overrides, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: jobs/distill.py exited with {proc.returncode}:\n{proc.stdout[-2000:]}")
    storage = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.storage_path="))
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.name="))
    run = Path(storage) / name
    latest = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    return json.loads((run / latest["checkpoint_dir_name"] / "state.json").read_text())


def bare_rate(teacher_path: Path, steps: int, batch: int = 64) -> float:
    import torch
    from gpu_smoke import timed_student_steps

    from brcd_dist.config import load_config
    from brcd_dist.models import build_student, load_hash_model
    from brcd_dist.train.state import Clustering

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "fashion_mnist.yaml", ["student.name=mobilenetv3_small_050"], validate=False)
    torch.manual_seed(0)
    k, bits = cfg.brcd.clusters, cfg.brcd.bits
    clustering = Clustering(
        centroids=torch.randn(k, bits), masks=torch.ones(k, bits), agreement=torch.ones(k, bits),
        counts=torch.ones(k), pseudo_labels={}, inertia=[0.0], n_mask_fallback=0, backend="torch-cpu",
    )  # fmt: skip
    views = {"view1": torch.randn(batch, 1, 32, 32), "view2": torch.randn(batch, 1, 32, 32)}
    views["key"] = [f"k{i}" for i in range(batch)]
    teacher, student = load_hash_model(teacher_path).eval(), build_student(cfg)
    return timed_student_steps(teacher, student, clustering, cfg, torch.device("cpu"), views, steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs="+", default=["."], help="checkouts to compare (default: this one)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each running every checkout once (default 3)")
    p.add_argument("--per-class", type=int, default=200, help="training images per class (default 200)")
    p.add_argument("--epochs", type=int, default=3, help="student epochs a run (default 3)")
    p.add_argument("--bare-steps", type=int, default=30, help="timed steps of the bare loop (default 30)")
    p.add_argument("--out", default="", help="append the JSON rows to this file")
    args = p.parse_args(argv)
    trees = [Path(t).resolve() for t in args.trees]

    from brcd_dist.data import write_shards

    work = Path(tempfile.mkdtemp(prefix="brcd-step-"))
    shards = work / "shards"
    write_shards(
        shards, "fashion_mnist", FASHION_MNIST, train_per_class=args.per_class, max_images=4000,
        samples_per_shard=250, progress=False,
    )  # fmt: skip
    server, url = start_mlflow(work)
    common = [
        "data.source=shards", f"data.shards_dir={shards}", "teacher.name=resnet10t",
        "student.name=mobilenetv3_small_050", "train.teacher_split=train", "train.eval_every=0",
        "train.checkpoint_every=100", f"tracking.uri={url}", "tracking.register=false",
        f"train.storage_path={work / 'runs'}",
    ]  # fmt: skip
    rows = []
    try:
        # the teacher every run loads: trained once, by the first checkout
        distill(trees[0], common + ["train.teacher_epochs=1", "train.epochs=1", "train.name=teacher"], work)
        # kept under its content key (teacher_reuse), or, by a checkout from before that, beside the run
        kept = sorted((work / "runs" / "teachers").glob("*.pt"))
        teacher = kept[0] if kept else work / "runs" / "teacher" / "teacher.pt"
        for r in range(args.rounds):
            for i, tree in enumerate(trees):
                name = f"r{r}-t{i}"
                state = distill(tree, common + [f"teacher.uri={teacher}", f"train.epochs={args.epochs}",
                                                f"train.name={name}"], work)  # fmt: skip
                rates = [row["student/images_per_s"] for row in state["history"]["train"] if "student/epoch" in row]
                steady = rates[1:] or rates  # the first epoch also builds the loader and warms the kernels
                rows.append({"round": r, "tree": str(tree), "pipeline_images_per_s": statistics.median(steady)})
                print(json.dumps(rows[-1]), flush=True)
            bare = bare_rate(teacher, args.bare_steps)
            for row in rows[-len(trees) :]:
                row.update(bare_images_per_s=round(bare, 1), ratio=round(row["pipeline_images_per_s"] / bare, 3))
    finally:
        server.kill()
        server.wait()
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{'checkout':<40} {'pipeline img/s':>15} {'bare img/s':>11} {'pipeline/bare':>14}")
    for tree in trees:
        mine = [r for r in rows if r["tree"] == str(tree)]
        pipeline, bare, ratio = (
            statistics.median(r[k] for r in mine) for k in ("pipeline_images_per_s", "bare_images_per_s", "ratio")
        )
        print(f"{str(tree):<40} {pipeline:>15.1f} {bare:>11.1f} {ratio:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
