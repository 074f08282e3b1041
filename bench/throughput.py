"""Throughput: (a) the student's BRCD training step through the full pipeline vs a bare PyTorch loop,
(b) encoding speed of students vs teachers.

(a) Pairing: ONE training process with ONE compute thread on each side, the same models (the config's teacher
    and student, random init), batch, loss and optimizer (torch AdamW, as DeepSpeed's `torch_adam`):
    - pipeline: `brcd_dist.driver.launch` (Ray Train TorchTrainer, 1 worker, DeepSpeed ZeRO-0, WebDataset
      shards streamed by 1 DataLoader worker process doing the decode and the paper's augmentations, frozen
      teacher forward on both views, k-means pseudo-labels and masks) with train.teacher_epochs=0 (the teacher
      keeps its seeded init: its weights do not change the step's cost), 2 student epochs of
      train.max_steps_per_epoch steps, no validation. The rate is the worker's own "student/images_per_s" of
      epoch 2 (epoch 1 pays for the loader's start): images (not views) / seconds of the step loop, data
      loading included.
    - bare: the same step in this process on views augmented once beforehand and held in memory, same random
      pseudo-labels/masks shape; run before and after the pipeline (the machine is shared: both are shown).
    The pipeline side also has its loader process working beside the step; on a machine with cores to spare
    that is the design (loading overlaps compute), so the ratio reads as "what the machinery costs the step".
(b) Encode images/s (eval mode, no grad, `HashModel.forward` + sign) of each teacher and its students, random
    init, at 1 and 2 threads; teacher and students alternate within each repeat (short timings, so that a
    burst of load on the shared machine hits one sample, not one model); median of repeats.

    python bench/throughput.py                          # (a) and (b) on the CPU, small sizes
    python bench/throughput.py --skip-pipeline          # (b) and the bare loop only
    python bench/throughput.py --device cuda            # GPU variant (not run on these machines)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from brcd_dist.config import load_config
from brcd_dist.models import HashModel

FASHION_PAIRS = ("resnet18", ["mobilenetv3_small_050", "lcnet_050", "lcnet_035"], 32, 1)
IMAGENET_PAIRS = ("vit_base_patch16_224", ["efficientnet_b0"], 224, 3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- (b) encode


def encode_rates(
    teacher: str,
    students: list[str],
    img_size: int,
    in_chans: int,
    *,
    batch: int,
    batches: int,
    repeats: int,
    threads: int,
    device: torch.device,
    bits: int = 64,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {name: HashModel(name, bits, in_chans, img_size).to(device).eval() for name in [teacher, *students]}
    x = torch.randn(batch, in_chans, img_size, img_size, device=device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for name, m in models.items():  # warm-up (allocator, oneDNN kernels, cudnn autotune)
            m(x)
        for _ in range(repeats):
            for name, m in models.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(batches):
                    torch.where(torch.sigmoid(m(x)) >= 0.5, 1.0, -1.0)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return {name: batch * batches / statistics.median(t) for name, t in times.items()}


def run_encode(args, device) -> list[dict]:
    rows = []
    cases = [FASHION_PAIRS + (args.batch_32, args.batches_32), IMAGENET_PAIRS + (args.batch_224, args.batches_224)]
    for teacher, students, size, chans, batch, batches in cases:
        for threads in args.threads:
            rates = encode_rates(
                teacher,
                students,
                size,
                chans,
                batch=batch,
                batches=batches,
                repeats=args.repeats,
                threads=threads,
                device=device,
            )
            for s in students:
                rows.append(
                    {
                        "size": f"{size}x{size}x{chans}",
                        "threads": threads,
                        "batch": batch,
                        "teacher": teacher,
                        "teacher_rate": rates[teacher],
                        "student": s,
                        "student_rate": rates[s],
                        "speedup": rates[s] / rates[teacher],
                    }
                )
                print(
                    f"encode {size}px {threads} thr: {teacher} {rates[teacher]:.1f} img/s, {s} "
                    f"{rates[s]:.1f} img/s, x{rates[s] / rates[teacher]:.2f}",
                    flush=True,
                )
    return rows


# ----------------------------------------------------------------------------- (a) bare training loop


def in_memory_views(cfg, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n training-subset images as the loader would give them (paper augmentations, epoch 0), made once."""
    from PIL import Image

    from brcd_dist.data.augment import TwoViews
    from brcd_dist.data.idx import load_fashion_mnist
    from brcd_dist.data.splits import train_subset

    arrays = load_fashion_mnist(cfg.data.source_path)
    idx = train_subset(arrays["train_labels"], cfg.data.train_per_class, cfg.data.split_seed)
    idx = np.resize(idx, n)
    keys = [f"train-{i:05d}" for i in idx]
    images = [Image.fromarray(arrays["train_images"][i], mode="L") for i in idx]
    v1, v2 = TwoViews(cfg.data.image_size, cfg.data.in_chans, cfg.train.seed, 0)(images, keys)
    return v1, v2, keys


def bare_rate(cfg, *, steps: int, threads: int, device: torch.device) -> float:
    """Images/s of the stage-C step in a plain loop: train/student_stage.student_step + backward + AdamW, under the
    run's autocast (gpu_smoke.timed_student_steps, the same loop the GPU smoke times), on one in-memory batch of
    augmented training images, with a random clustering of the config's K."""
    from gpu_smoke import timed_student_steps

    from brcd_dist.models import build_student, build_teacher
    from brcd_dist.train.state import Clustering

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    B, L, K = cfg.train.batch_size, cfg.brcd.bits, cfg.brcd.clusters
    teacher = build_teacher(cfg).to(device).eval().requires_grad_(False)
    student = build_student(cfg).to(device).train()
    v1, v2, keys = in_memory_views(cfg, B)
    gen = torch.Generator().manual_seed(0)
    clustering = Clustering(
        centroids=(torch.randint(0, 2, (K, L), generator=gen) * 2 - 1).float().to(device),
        masks=(torch.rand(K, L, generator=gen) < 0.7).float().to(device),
        agreement=torch.zeros(K, L),
        counts=torch.zeros(K),
        pseudo_labels={k: int(torch.randint(K, (1,), generator=gen)) for k in keys},
        inertia=[],
        n_mask_fallback=0,
        backend="none",
    )
    views = {"view1": v1.to(device), "view2": v2.to(device), "key": keys}
    return timed_student_steps(teacher, student, clustering, cfg, device, views, steps)


# ----------------------------------------------------------------------------- (a) the pipeline


def pipeline_rates(cfg, *, steps: int) -> list[float]:
    """Run stages A (init teacher) to D under Ray Train; return the student's images/s of each epoch."""
    from dataclasses import replace

    import ray

    from brcd_dist.data import ensure_shards
    from brcd_dist.driver import absolute_paths, launch, read_outputs, result_checkpoint_dir

    storage = tempfile.mkdtemp(prefix="brcd-throughput-")
    cfg.train = replace(
        cfg.train,
        workers=1,
        cpus_per_worker=1,
        teacher_epochs=0,
        epochs=2,
        max_steps_per_epoch=steps,
        eval_every=0,
        checkpoint_every=1 << 30,
        storage_path=storage,
        name="throughput",
        max_failures=0,
    )
    cfg.eval = replace(cfg.eval, max_queries=200, max_database=1000)
    cfg.tracking = replace(cfg.tracking, enabled=False)
    cfg = absolute_paths(cfg)
    ensure_shards(cfg)
    temp_dir = tempfile.mkdtemp(prefix="brcd-ray-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}},
    )
    try:
        out = read_outputs(result_checkpoint_dir(launch(cfg)))
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)  # this run's checkpoints and Ray's files: about 100 MB
        shutil.rmtree(temp_dir, ignore_errors=True)
    return [r["student/images_per_s"] for r in out.state.history["train"] if "student/images_per_s" in r]


def run_training(args, device) -> dict:
    overrides = [f"train.batch_size={args.batch}", "data.loader_workers=1"]
    if device.type == "cuda":
        overrides.append("train.use_gpu=true")
    cfg = load_config(args.config, overrides)
    kw = dict(steps=args.steps, threads=1, device=device)
    bare = [bare_rate(cfg, **kw)]
    print(f"bare loop: {bare[-1]:.1f} img/s", flush=True)
    res: dict = {"batch": args.batch, "steps": args.steps, "bare": bare}
    if not args.skip_pipeline:
        t0 = time.perf_counter()
        res["pipeline_epochs"] = pipeline_rates(cfg, steps=args.steps)
        res["pipeline_wall_s"] = time.perf_counter() - t0
        print(f"pipeline: {res['pipeline_epochs']} img/s per epoch ({res['pipeline_wall_s']:.0f} s)", flush=True)
        bare.append(bare_rate(cfg, **kw))
        print(f"bare loop again: {bare[-1]:.1f} img/s", flush=True)
        # Conservative: against the fastest bare run (the load only ever slows a side down).
        res["ratio"] = res["pipeline_epochs"][-1] / max(bare)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=64, help="(a) per-step batch")
    ap.add_argument("--steps", type=int, default=30, help="(a) timed steps per epoch / bare run")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7, help="(b) interleaved timings per model; median")
    ap.add_argument("--batch-32", type=int, default=256)
    ap.add_argument("--batches-32", type=int, default=1)
    ap.add_argument("--batch-224", type=int, default=8)
    ap.add_argument("--batches-224", type=int, default=1)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    out: dict = {}
    if not args.skip_training:
        out["training"] = run_training(args, device)
    if not args.skip_encode:
        out["encode"] = run_encode(args, device)
    print()
    if "training" in out:
        t = out["training"]
        print(f"(a) batch {t['batch']}, {t['steps']} steps, 1 process x 1 thread each side")
        print("| side | images/s |\n|---|---|")
        for i, r in enumerate(t["bare"]):
            print(f"| bare PyTorch loop, run {i + 1} | {r:.1f} |")
        for i, r in enumerate(t.get("pipeline_epochs", [])):
            print(f"| pipeline (Ray Train + DeepSpeed + WebDataset), epoch {i + 1} | {r:.1f} |")
        if "ratio" in t:
            print(f"| **ratio: pipeline epoch 2 / fastest bare run** | **{t['ratio']:.2f}** |")
    if "encode" in out:
        print("\n(b) | input | threads | batch | teacher img/s | student | student img/s | student / teacher |")
        print("|---|---|---|---|---|---|---|")
        for r in out["encode"]:
            print(
                f"| {r['size']} | {r['threads']} | {r['batch']} | {r['teacher']} {r['teacher_rate']:.1f} | "
                f"{r['student']} | {r['student_rate']:.1f} | {r['speedup']:.2f}x |"
            )
    return out


if __name__ == "__main__":
    main()
