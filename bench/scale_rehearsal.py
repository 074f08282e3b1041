"""Scale rehearsal: an ImageNet-shaped synthetic JPEG ImageFolder (1,000 classes) at several sizes, through
make_shards, the whole pipeline with tiny models and few steps, jobs/index.py and jobs/search.py; per stage wall
time, CPU time, peak RSS per process and bytes on disk, and how each grows with N (DESIGN §5: linear or better).

    .venv/bin/python bench/scale_rehearsal.py --sizes 10000 40000 160000   # one folder, 10% held out
    .venv/bin/python bench/scale_rehearsal.py --sizes 1281167 --val-per-class 50 --procs 2   # ImageNet-1k's counts
    .venv/bin/python bench/scale_rehearsal.py --sizes 2000 4000 8000       # a 2-core smoke

Each stage is a subprocess; a sampler thread walks its process tree every 0.5 s with psutil: peak RSS per
process (grouped by role: driver, Ray train workers, other Ray processes), CPU time summed over the tree's
processes at their last sample (a process that ends between two samples loses at most 0.5 s of CPU in the sum).
Images are small (64x48, JPEG q90, crops of scikit-learn's photos tinted per class), so the pixel work is small
and what grows with N is the rest: listing, splitting, the manifest, shard I/O, epoch plans, k-means, codes and
evaluation. `--val-per-class V` writes ImageNet's layout: N images in train/ (the database) and V a class in
val/ (the queries). Writes one JSON line per (size, stage) to --out as each stage ends and prints a table with
each quantity's growth exponent between sizes (log ratio / log N ratio: 1 = linear). `--stages retrieval`
times the evaluation's Hamming ranking alone at the same shapes (no images), per query, as one rank runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
PY = sys.executable


def role(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "driver"
    try:
        name = " ".join(proc.cmdline())[:200]
    except psutil.Error:
        return "gone"
    if "RayTrainWorker" in name or "TrainController" in name:
        return "ray_train_worker"
    if "ray::" in name or "default_worker.py" in name:
        return "ray_worker"
    if "raylet" in name or "gcs_server" in name or "dashboard" in name or "log_monitor" in name:
        return "ray_system"
    return "other"


# "[encode database (teacher, student)] done: 40 batches in 12.3 s (3.2/s)", Ray's "(pid=..)" prefix allowed
DONE_LINE = re.compile(r"\[([^\]]+)\] done: .*? in ([0-9.]+) s")


# an encoding bar at its end, "encode database (teacher): 100%|####| 20.0/20.0 [00:21<00:00, 1.1s/batch]"
ENCODE_BAR = re.compile(r"(encode [^:\r\n]*?): +100%\|[^|]*\| *[0-9.]+[kM]?/[0-9.]+[kM]? *\[(?:(\d+):)?(\d+):(\d+)<")


WRITTEN = ".written"  # marks a synthetic folder complete


def substages(output: str) -> dict[str, float]:
    """Rank 0's wall seconds per sub-stage from the jobs' '[NAME] done: ... in S s' lines (summed per NAME) and
    the encoding bars' final elapsed time (they print no done line)."""
    out: dict[str, float] = {}
    for name, seconds in DONE_LINE.findall(output):
        out[name] = out.get(name, 0.0) + float(seconds)
    bars: dict[str, float] = {}
    for name, h, m, sec in ENCODE_BAR.findall(output):
        name = name.split("  run about")[0]  # the bar's remaining-time estimate is not part of its name
        bars[name] = max(bars.get(name, 0.0), 3600 * int(h or 0) + 60 * int(m) + int(sec))
    # the run summary's "time  5m47s: shards 0s, teacher 1s, ..., evaluation 2s, start-up 25s" line
    for line in output.splitlines():
        if line.startswith("time ") and ":" in line:
            for name, dur in re.findall(r"([a-z-]+) ((?:\d+h)?(?:\d+m)?\d+s)", line.split(":", 1)[1]):
                h, m, sec = (re.search(rf"(\d+){u}", dur) for u in "hms")
                out[f"summary {name}"] = sum(int(x.group(1)) * f for x, f in ((h, 3600), (m, 60), (sec, 1)) if x)
    return {**out, **bars}


def measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run cmd; wall, CPU over its process tree, peak RSS per role (max over that role's processes), and the
    sub-stages' wall seconds from its output (kept in `log` when given)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    cpu: dict[int, float] = {}
    rss: dict[str, int] = {}
    roles: dict[int, str] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    with p.oneshot():
                        t, m = p.cpu_times(), p.memory_info().rss
                    cpu[p.pid] = t.user + t.system
                    r = roles.setdefault(p.pid, role(p, proc.pid))
                    rss[r] = max(rss.get(r, 0), m)
                except psutil.Error:
                    pass
            done.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = proc.communicate()[0]
    done.set()
    thread.join()
    if log is not None:
        log.write_text(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": sum(cpu.values()),
        "peak_rss_mb": {r: v / 2**20 for r, v in sorted(rss.items())},
        "processes": len(cpu),
        "substages_s": substages(output),
    }


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rehearse(n: int, work: Path, args, emit) -> None:
    """The stages at size n; `emit(row)` as each ends (a run stopped later keeps the rows so far)."""
    from synthetic_imagefolder import make_image_folder

    folder = work / f"folder_{n}"
    if not (folder / WRITTEN).exists():  # an earlier run's folder is neither written nor timed again
        t0 = time.perf_counter()
        if args.val_per_class:  # ImageNet's layout: N training images in train/, val/ held out as the queries
            make_image_folder(
                folder, classes=1000, total=n, val_per_class=args.val_per_class, size=(64, 48), procs=args.procs
            )
        else:  # one folder, 10% of each class held out
            make_image_folder(folder, classes=1000, per_class=max(2, n // 1000), size=(64, 48), procs=args.procs)
        (folder / WRITTEN).touch()
        emit({"n": n, "stage": "source", "wall_s": time.perf_counter() - t0, "bytes": du(folder)})
    shards = work / f"shards_{n}"
    data = [
        "data.source=imagefolder",
        f"data.source_path={folder}",
        f"data.shards_dir={shards}",
        "data.image_size=32",
        "data.in_chans=3",
        "data.train_per_class=5",  # below the 1-held-out limit at 10 images a class; the same subset at every N
        "data.samples_per_shard=1000",
        "data.shard_shorter_side=0",
        "data.shard_readers=4",
        "data.loader_workers=1",
    ]
    if "shards" in args.stages or not (shards / "manifest.json").exists():
        r = measured([PY, "jobs/make_shards.py", *data, "--procs", "1"], log=work / f"make_shards_{n}.log")
        emit({"n": n, "stage": "make_shards", **r, "bytes": du(shards)})
    runs = work / f"runs_{n}"
    if "pipeline" in args.stages:
        overrides = [
            "data.source=shards",
            f"data.shards_dir={shards}",
            "data.image_size=32",
            "data.in_chans=3",
            "data.loader_workers=1",
            "teacher.name=resnet10t",
            "student.name=mobilenetv3_small_050",
            "train.teacher_epochs=1",
            "train.teacher_split=train",
            "train.epochs=1",
            "train.batch_size=32",
            f"train.max_steps_per_epoch={args.steps}",
            "train.checkpoint_every=1000",
            "train.eval_every=1",
            "eval.topk=100",
            "eval.batch_size=256",
            "brcd.clusters=100",
            "tracking.enabled=false",
            "train.workers=2",
            f"train.storage_path={runs}",
            f"train.name=rehearsal_{n}",
        ]
        r = measured([PY, "jobs/distill.py", *overrides], log=work / f"pipeline_{n}.log")
        emit({"n": n, "stage": "pipeline", **r, "bytes": du(runs)})
    if "index" in args.stages:  # the run's final student encodes the database into a FAISS binary index
        student = max(runs.rglob("student.pt"), key=lambda f: f.stat().st_mtime)
        index = work / f"index_{n}"
        cmd = [PY, "jobs/index.py", str(student), "--images", str(shards), "--out", str(index), "--no-log"]
        r = measured(cmd, log=work / f"index_{n}.log")
        emit({"n": n, "stage": "index", **r, "bytes": du(index)})
        from brcd_dist.data.sources import stable_keys

        # the first and a middle training key (the last may be a held-out query), named as the source names them
        keys = stable_keys("train" if args.val_per_class else "img", (0, n // 2), n)
        cmd = [PY, "jobs/search.py", str(index), "--query-key", *keys, "--k", "10"]
        r = measured(cmd, log=work / f"search_{n}.log")
        emit({"n": n, "stage": "search", **r, "bytes": 0})


def retrieval_cost(n: int, queries: int = 0, sample: int = 500) -> dict:
    """The evaluation's ranking alone at the rehearsal's shapes for N: what one rank runs on its share of the
    queries (retrieval.average_precisions and pr_sums on packed 64-bit codes, 1,000 labels, one thread), timed on
    `sample` queries and given per query. Database 0.9 N and N/20 queries (the one-folder layout), or N and
    `queries` (ImageNet's). Codes are random with half the database on 2,000 repeated codes, as trained codes
    cluster: ties are common, and the cost of the ranking does not depend on their values otherwise."""
    import numpy as np
    import torch

    from brcd_dist.retrieval import average_precisions, pr_sums

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    q, d = (queries, n) if queries else (n // 20, n * 9 // 10)
    db = rng.integers(0, 256, (d, 8), dtype=np.uint8)
    db[: d // 2] = db[rng.integers(0, 2000, d // 2)]
    qc = db[rng.integers(0, d, sample)]
    ql, dl = rng.integers(0, 1000, sample), rng.integers(0, 1000, d)
    t = time.process_time()
    average_precisions(qc, db, ql, dl, 100)
    per_query = (time.process_time() - t) / sample
    t = time.process_time()
    pr_sums(qc[: sample // 5], db, ql[: sample // 5], dl)
    pr_per_query = (time.process_time() - t) / (sample // 5)
    return {
        "n": n,
        "stage": "retrieval",
        "queries": q,
        "database": d,
        "map_cpu_ms_per_query": 1e3 * per_query,
        "map3_cpu_s": 3 * q * per_query,  # the three paradigms over every query, summed over the ranks
        "pr_curve_cpu_ms_per_query": 1e3 * pr_per_query,
    }


def growth(rows: list[dict], stage: str, field: str) -> str:
    pts = [(r["n"], r[field]) for r in rows if r["stage"] == stage and r.get(field)]
    if len(pts) < 2:
        return "-"
    return " ".join(f"{math.log(b[1] / a[1]) / math.log(b[0] / a[0]):.2f}" for a, b in zip(pts, pts[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 8000])
    p.add_argument("--stages", default="shards,pipeline,index", help="shards,pipeline,index | retrieval")
    p.add_argument(
        "--val-per-class", type=int, default=0, help="ImageNet's layout: N images in train/, this many a class in val/"
    )
    p.add_argument("--procs", type=int, default=1, help="processes writing the synthetic folder")
    p.add_argument("--steps", type=int, default=3, help="train.max_steps_per_epoch")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "brcd_scale_rehearsal"))
    p.add_argument("--out", default="bench/results/scale_rehearsal.jsonl")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.stages == "retrieval":  # the evaluation's Hamming ranking alone, no images
        for n in args.sizes:
            queries = 500 * args.val_per_class  # half of val/ (1,000 classes); the other half is the test
            print(json.dumps(retrieval_cost(n, queries)), flush=True)
        return

    def emit(row: dict) -> None:
        row["peak_rss_max_mb"] = max(row.get("peak_rss_mb", {0: 0}).values() or [0])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(REPO / args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    for n in args.sizes:
        rehearse(n, work, args, emit)
    print(f"{'stage':<12} {'N':>8} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'MB on disk':>11}")
    for r in rows:
        print(
            f"{r['stage']:<12} {r['n']:>8} {r['wall_s']:>8.1f} {r.get('cpu_s', 0):>8.1f} "
            f"{r.get('peak_rss_max_mb', 0):>12.0f} {r['bytes'] / 2**20:>11.1f}"
        )
    print("growth exponents between consecutive sizes (1 = linear):")
    for stage in ("make_shards", "pipeline", "index"):
        print(
            f"  {stage}: wall {growth(rows, stage, 'wall_s')}, CPU {growth(rows, stage, 'cpu_s')}, "
            f"peak RSS {growth(rows, stage, 'peak_rss_max_mb')}, disk {growth(rows, stage, 'bytes')}"
        )


if __name__ == "__main__":
    main()
