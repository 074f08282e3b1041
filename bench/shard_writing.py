"""Shard writing cost before and after JPEG shards: CPU seconds per stored sample and bytes per sample.

    .venv/bin/python bench/shard_writing.py --baseline OLD_CHECKOUT [--classes 10] [--per-class 30]

Writes the same synthetic JPEG ImageFolder (bench/synthetic_imagefolder.py) into shards three ways, each in a fresh
process (one encoding process, num_procs=1, so process_time is the whole cost) and `--repeats` times interleaved:
- before: the code at --baseline (the commit before JPEG shards): decode, resize to 256, re-encode as PNG;
- jpeg256: this tree, shorter_side=256 (JPEG stays JPEG, resized once, quality 90);
- copy: this tree, shorter_side=0 (the source's JPEG bytes copied).
Prints one JSON row per run and a median summary.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARD_KW = dict(seed=0, train_per_class=10, samples_per_shard=100, in_chans=3, progress=False)


def child(folder: str, mode: str) -> dict:
    import inspect

    from brcd_dist.data import write_shards

    kw = dict(SHARD_KW)
    if "shorter_side" in inspect.signature(write_shards).parameters:
        kw["shorter_side"] = 256 if mode == "jpeg256" else 0
    else:
        kw["image_size"] = 224  # the old API: stored_size(224) = 256, PNG
    with tempfile.TemporaryDirectory() as out:
        c0, t0 = time.process_time(), time.perf_counter()
        m = write_shards(out, "imagefolder", folder, num_procs=1, **kw)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        n = sum(s.count for s in m.splits.values())
        size = sum(f.stat().st_size for f in Path(out).glob("*.tar"))
    return dict(
        mode=mode,
        samples=n,
        cpu_ms_per_sample=1000 * cpu / n,
        wall_ms_per_sample=1000 * wall / n,
        kb_per_sample=size / n / 1024,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="a checkout of the code before (its brcd_dist)")
    p.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "data_bench" / "folder300"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic_imagefolder import make_image_folder

    make_image_folder(args.folder, classes=args.classes, per_class=args.per_class)
    src_kb = sum(f.stat().st_size for f in Path(args.folder).rglob("*.JPEG")) / 1024 / (args.classes * args.per_class)
    rows = []
    for _ in range(args.repeats):
        for mode, code in (("before", args.baseline), ("jpeg256", str(REPO)), ("copy", str(REPO))):
            env = {**os.environ, "PYTHONPATH": code}
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--child", args.folder, mode],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            rows.append(json.loads(out))
            print(out, flush=True)
    print(f"source JPEG: {src_kb:.1f} KB/image")
    for mode in ("before", "jpeg256", "copy"):
        mine = [r for r in rows if r["mode"] == mode]
        print(
            f"{mode:8s} median CPU {statistics.median(r['cpu_ms_per_sample'] for r in mine):6.2f} ms/sample, "
            f"{statistics.median(r['kb_per_sample'] for r in mine):6.1f} KB/sample ({len(mine)} runs)"
        )


if __name__ == "__main__":
    main()
