"""The whole pipeline on one machine's GPU, in one command, with a JSON report: `jobs/distill.py` (stages A–D, MLflow
tracking and the registry on a local sqlite store) on a synthetic JPEG ImageFolder, one train worker killed in the
middle of stage C and the run resumed from its checkpoint by Ray Train, then a bare loop of the student's training
step on the same device, so that the pipeline's rate can be read against it.

    bash scripts/gpu_smoke.sh run WHEELS --out gpu_smoke.json    # a GPU machine with no package index
    .venv/bin/python bench/gpu_smoke.py --cpu --out smoke.json   # the CPU mode (tests/test_gpu_smoke.py runs it)

The report: time per stage (when each stage's first checkpoint was registered), training and encoding images/s
per worker, peak GPU memory, the test mAPs, the attempts (the kill and the resume), the student step's
pipeline ÷ bare-loop ratio, whether FAISS and torch see the same GPUs, and `could_not`: what this machine could not
show. Both modes compute in bf16, as a GPU run does (train.precision=bf16: DeepSpeed's torch_autocast mode, the
frozen teacher and the encoders under autocast); the GPU mode decodes and augments its batches on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from faults import MidStageCKiller, alive_train_worker_pids, descendant_train_worker_pids, latest_checkpoint  # noqa: E402

RUN_NAME = "smoke"


def synthetic_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """ROOT/{train,val}/CLASS/*.jpg: each class a smooth random pattern of its own, each image that pattern shifted,
    scaled in brightness and noised (numpy and PIL only: nothing to download, no scikit-learn on a GPU image)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        coarse = np.random.default_rng([seed, c]).random((4, 4, 3)) * 255
        pattern = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((2 * size, 2 * size), Image.BICUBIC))
        for part, count in (("train", per_class), ("val", max(2, per_class // 4))):
            folder = root / part / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                top, left = rng.integers(0, size, 2)
                crop = pattern[top : top + size, left : left + size].astype(np.float32)
                img = crop * rng.uniform(0.7, 1.3) + rng.normal(0, 12, crop.shape)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def distill_args(args, folder: Path, work: Path) -> list[str]:
    gpu = not args.cpu
    return [
        "data.source=imagefolder",
        f"data.source_path={folder}",
        f"data.shards_dir={work / 'shards'}",
        f"data.image_size={args.image_size}",
        "data.in_chans=3",
        f"data.train_per_class={args.per_class // 2}",
        f"data.samples_per_shard={args.samples_per_shard}",
        f"data.loader_workers={args.loader_workers}",
        f"teacher.name={args.teacher}",
        f"student.name={args.student}",
        f"brcd.clusters={args.classes}",
        f"train.workers={1 if gpu else 2}",
        f"train.use_gpu={str(gpu).lower()}",
        "train.precision=bf16",
        f"train.cpus_per_worker={args.cpus_per_worker}",
        f"train.teacher_epochs={args.teacher_epochs}",
        "train.teacher_split=train",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.checkpoint_every={args.checkpoint_every}",
        "train.eval_every=1",
        "train.max_failures=1",
        f"train.storage_path={work / 'runs'}",
        f"train.name={RUN_NAME}",
        f"eval.topk={args.topk}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ]


def run_distill(args, folder: Path, work: Path, report: dict):
    """jobs/distill.py in a subprocess, with the killer watching its run directory; returns its final outputs."""
    from brcd_dist.driver import read_outputs

    run_dir = str(work / "runs" / RUN_NAME)
    cluster = os.environ.get("RAY_ADDRESS")  # a running Ray (distill.py joins it), else one it starts below us
    find = (lambda: alive_train_worker_pids(cluster)) if cluster else descendant_train_worker_pids
    killer = MidStageCKiller(find_pids=find, kill=not args.no_kill)
    finished = threading.Event()
    watcher = threading.Thread(target=killer, args=(run_dir, finished), daemon=True)
    cmd = [sys.executable, str(REPO / "jobs" / "distill.py"), *distill_args(args, folder, work)]
    report["command"] = " ".join(["python", "jobs/distill.py", *cmd[2:]]).replace(str(work), "WORK")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    t0 = time.perf_counter()
    watcher.start()
    with open(work / "distill.log", "w") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    finished.set()
    watcher.join(timeout=30)
    report["distill_seconds"] = round(time.perf_counter() - t0, 1)
    report["distill_exit_code"] = proc.returncode
    seen = killer.stage_seen
    marks = [("teacher", "clustering"), ("clustering", "student"), ("student_and_test", "done")]
    start = 0.0
    report["stage_seconds"] = {}
    for name, mark in marks:  # a stage ends when the first checkpoint of the next one is registered
        if mark in seen:
            report["stage_seconds"][name] = round(seen[mark] - start, 1)
            start = seen[mark]
    report["killed_worker_at"] = (
        {k: killer.state_at_kill[k] for k in ("stage", "epoch", "step_in_epoch", "global_step")}
        if killer.state_at_kill
        else None
    )
    if killer.error is not None:
        report["could_not"].append(f"kill a worker mid stage C: {killer.error}")
    if proc.returncode != 0:
        tail = (work / "distill.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"jobs/distill.py exited with {proc.returncode}:\n" + "\n".join(tail))
    return read_outputs(Path(run_dir) / latest_checkpoint(str(run_dir))[0])


def timed_student_steps(teacher, student, clustering, cfg, device, views: dict, steps: int) -> float:
    """Images/s of the student's training step alone (student_step, backward, AdamW; under the run's autocast) on
    `views` already on `device`, after 3 warm-up steps: the bare loop a pipeline's rate is read against. The weights
    stay fp32, as in the pipeline (train/engine.py)."""
    import torch

    from brcd_dist.train.precision import autocast, train_dtype
    from brcd_dist.train.student_stage import student_step

    dtype = train_dtype(cfg.train, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(steps + 3):
        if i == 3:  # after the warm-up: kernels chosen, allocator grown
            sync()
            t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = student_step(views, teacher, student, clustering, cfg, device)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return steps * len(views["key"]) / (time.perf_counter() - t0)


def bare_student_steps(outputs, args, device, steps: int) -> float:
    """The bare student step on this run's teacher and clustering, at the run's batch and input size."""
    import torch

    from brcd_dist.config import load_config
    from brcd_dist.models import build_student
    from brcd_dist.train.student_stage import on_device

    cfg = load_config(None, distill_args(args, Path("."), Path(".")), validate=False)
    torch.set_num_threads(int(cfg.train.cpus_per_worker))  # a worker's share, as in the pipeline
    torch.manual_seed(0)
    b, s = cfg.train.batch_size, cfg.data.image_size
    views = {
        "view1": torch.randn(b, 3, s, s, device=device),
        "view2": torch.randn(b, 3, s, s, device=device),
        "key": [f"bare-{i}" for i in range(b)],
    }
    teacher = outputs.teacher.to(device).eval()
    student = build_student(cfg).to(device)
    return timed_student_steps(teacher, student, on_device(outputs.clustering, device), cfg, device, views, steps)


def device_checks(args, report: dict):
    import torch

    report["torch"] = torch.__version__
    report["torch_cuda"] = torch.version.cuda
    report["torch_gpus"] = torch.cuda.device_count()
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    try:
        import faiss

        report["faiss"] = faiss.__version__
        report["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError as err:
        report["faiss"], report["faiss_gpus"] = None, 0
        report["could_not"].append(f"import faiss ({err}): k-means assigns with torch")
    if not args.cpu:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_smoke: torch sees no GPU; --cpu runs the CPU mode")
        if report["faiss_gpus"] != report["torch_gpus"]:
            report["could_not"].append(
                f"FAISS sees {report['faiss_gpus']} GPUs and torch {report['torch_gpus']}: k-means on the GPU runs "
                "as a torch matmul, not FAISS (install the CUDA 13 FAISS build, scripts/gpu_smoke.sh)"
            )
        report["could_not"].append("NCCL across ranks: one GPU gives one rank (the collectives are identities)")
    else:
        report["could_not"].append("a GPU: --cpu runs gloo ranks on the CPU, decoding in the loader")
    return torch.device("cpu" if args.cpu else "cuda", 0)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the CPU mode: 2 gloo workers, small sizes (CI)")
    p.add_argument("--out", default="gpu_smoke.json", help="the JSON report (default gpu_smoke.json)")
    p.add_argument("--work", default="", help="working folder (default: a new temporary one)")
    p.add_argument("--classes", type=int, default=0, help="synthetic classes (default 10 on CPU, 20 on GPU)")
    p.add_argument("--per-class", type=int, default=0, help="training images per class (default 24 / 400)")
    p.add_argument("--image-size", type=int, default=0, help="input size in pixels (default 32 / 96)")
    p.add_argument("--teacher", default="", help="teacher timm model (default resnet10t / resnet50)")
    p.add_argument("--student", default="mobilenetv3_small_050", help="student timm model")
    p.add_argument("--teacher-epochs", type=int, default=1, help="teacher epochs (default 1)")
    p.add_argument("--epochs", type=int, default=2, help="student epochs (default 2)")
    p.add_argument("--batch-size", type=int, default=0, help="per-worker batch (default 16 / 128)")
    p.add_argument("--bare-steps", type=int, default=0, help="timed steps of the bare loop (default 5 / 50)")
    p.add_argument("--no-kill", action="store_true", help="do not kill a worker in stage C")
    p.add_argument("--timeout", type=int, default=1500, help="seconds before the distillation is stopped")
    args = p.parse_args(argv)
    gpu = not args.cpu
    for name, cpu_value, gpu_value in (
        ("classes", 10, 20),
        ("per_class", 24, 400),
        ("image_size", 32, 96),
        ("batch_size", 16, 128),
        ("bare_steps", 5, 50),
    ):
        if not getattr(args, name):
            setattr(args, name, gpu_value if gpu else cpu_value)
    args.teacher = args.teacher or ("resnet50" if gpu else "resnet10t")
    args.cpus_per_worker = 8 if gpu else 1
    args.loader_workers = 4 if gpu else 1
    args.samples_per_shard = 400 if gpu else 30
    args.topk = 100 if gpu else 50
    # a checkpoint inside the first student epoch, where the killer waits for one
    steps = max(1, (args.classes * args.per_class // 2) // (args.batch_size * (1 if gpu else 2)))
    args.checkpoint_every = max(1, steps // 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report: dict = {"mode": "cpu" if args.cpu else "gpu", "could_not": []}
    work = Path(args.work or tempfile.mkdtemp(prefix="brcd-smoke-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    status = 0
    try:
        device = device_checks(args, report)
        folder = synthetic_folder(work / "images", args.classes, args.per_class, args.image_size)
        outputs = run_distill(args, folder, work, report)
        state, test = outputs.state, outputs.test
        train_rows = state.history["train"]
        report["maps"] = {k: v for k, v in test.items() if k.endswith("_map")}
        last = {k: r[k] for r in train_rows for k in ("teacher/images_per_s", "student/images_per_s") if k in r}
        report["images_per_s_per_worker"] = {
            "teacher_training": last.get("teacher/images_per_s"),  # each stage's last epoch
            "student_training": last.get("student/images_per_s"),
            "teacher_encoding": test.get("teacher_images_per_s"),
            "student_encoding": test.get("student_images_per_s"),
        }
        report["peak_gpu_memory_gb"] = test.get("peak_gpu_memory_gb")
        report["attempts"] = state.history["attempts"]
        if not args.no_kill and len(state.history["attempts"]) < 2:
            report["could_not"].append("resume: the run finished in one attempt (no kill landed)")
        bare = bare_student_steps(outputs, args, device, args.bare_steps)
        pipeline = report["images_per_s_per_worker"]["student_training"]
        report["student_step"] = {
            "pipeline_images_per_s": pipeline,
            "bare_images_per_s": round(bare, 1),
            "pipeline_over_bare": round(pipeline / bare, 3) if pipeline else None,
        }
    except Exception as err:  # noqa: BLE001 - the report says what failed; the exit code too
        report["error"] = f"{type(err).__name__}: {err}"
        status = 1
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
