"""The reading path's cost per core: shards -> decode -> two views, against a bare loop over the same bytes.

    .venv/bin/python bench/dataloader.py [--images 256] [--repeats 3] [--size 224]

On one thread (torch.set_num_threads(1), loader in-process: num_workers=0), CPU seconds by process_time, so the
figures are per core. Measured side by side, `--repeats` rounds interleaved (reading and bare alternate which
runs first), medians reported:
- reading: train_batches over JPEG shards (a synthetic ImageFolder, bench/synthetic_imagefolder.py, written with
  shorter_side=256), decode + two views with tensor_augment, as a CPU training run reads them;
- bare: the same JPEG bytes held in memory, decoded (decoding.decode_uint8) and augmented (TensorTwoViews) in
  chunks of 64, no shards, no loader; the ratio reading / bare is the reader's overhead (goal >= 0.9);
- decode: JPEG vs PNG of the same 256-px images (bytes per image, ms per decode);
- augment: tensor_augment vs the PIL path (augment.TwoViews), two views of one image, ms;
- device: where CUDA is present, decode_jpeg(device="cuda") + the same augmentation on the GPU (samples/s).
Prints one JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from brcd_dist.data import augment, tensor_augment, train_batches, write_shards  # noqa: E402 (after the sys.path line)
from brcd_dist.data.decoding import decode_batch, decode_uint8  # noqa: E402 (after the sys.path line)


def shard_samples(manifest, split):
    out = []
    for name in manifest.splits[split].shards:
        with tarfile.open(Path(manifest.shards_dir) / name) as tar:
            files: dict = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(m).read()
        out += [(k, v["jpg"]) for k, v in files.items()]
    return out


def cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def run(args) -> list[dict]:
    from synthetic_imagefolder import make_image_folder

    torch.set_num_threads(1)
    folder = make_image_folder(Path(args.work) / "folder", classes=8, per_class=args.images // 8)
    manifest = write_shards(
        Path(args.work) / "shards",
        "imagefolder",
        str(folder),
        train_per_class=4,
        samples_per_shard=64,
        in_chans=3,
        shorter_side=256,
        progress=False,
    )
    samples = shard_samples(manifest, "database")
    n = len(samples)
    keys, jpegs = [k for k, _ in samples], [b for _, b in samples]
    pngs = []
    for b in jpegs:
        buf = io.BytesIO()
        Image.open(io.BytesIO(b)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pil_images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs[:64]]
    uint8_images = [decode_uint8(b, 3) for b in jpegs[:64]]
    size = args.size

    def reading():
        for _ in train_batches(
            manifest,
            "database",
            rank=0,
            world_size=1,
            batch_size=64,
            num_workers=0,
            image_size=size,
            in_chans=3,
            epoch=0,
            seed=0,
        ):
            pass

    def bare():
        views = tensor_augment.TensorTwoViews(size, 3, 0, 0)
        for s in range(0, n, 64):
            views([decode_uint8(b, 3) for b in jpegs[s : s + 64]], keys[s : s + 64])

    rows = []
    for r in range(args.repeats):
        if r % 2:  # alternate which goes first: neither always meets the other's leftovers (heap, caches)
            t_bare, t_read = cpu(bare), cpu(reading)
        else:
            t_read, t_bare = cpu(reading), cpu(bare)
        rows.append(
            dict(
                what="reading_vs_bare",
                round=r,
                samples=n,
                reading_per_core=n / t_read,
                bare_per_core=n / t_bare,
                ratio=t_bare / t_read,
            )
        )
        if args.pair_only:  # the other measurements churn the heap between the pair's rounds
            print(json.dumps(rows[-1]), flush=True)
            continue
        t_jpg = cpu(lambda: [decode_uint8(b, 3) for b in jpegs])
        t_png = cpu(lambda: [decode_uint8(b, 3) for b in pngs])
        rows.append(
            dict(
                what="decode",
                round=r,
                jpeg_kb=sum(map(len, jpegs)) / n / 1024,
                png_kb=sum(map(len, pngs)) / n / 1024,
                jpeg_ms=1000 * t_jpg / n,
                png_ms=1000 * t_png / n,
            )
        )
        t_pil = cpu(lambda: augment.TwoViews(size, 3, 0, 0)(pil_images, keys[:64]))
        t_ten = cpu(lambda: tensor_augment.TensorTwoViews(size, 3, 0, 0)(uint8_images, keys[:64]))
        rows.append(dict(what="augment_two_views", round=r, pil_ms=1000 * t_pil / 64, tensor_ms=1000 * t_ten / 64))
        if torch.cuda.is_available():
            payloads = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
            views = tensor_augment.TensorTwoViews(size, 3, 0, 0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for s in range(0, n, 64):
                images, _ = decode_batch(payloads[s : s + 64], 3, "cuda")
                views(images, keys[s : s + 64])
            torch.cuda.synchronize()
            rows.append(dict(what="device", round=r, samples_per_s=n / (time.perf_counter() - t0)))
        for row in rows[-4:]:
            if row["round"] == r:
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--work", default="")
    p.add_argument("--pair-only", action="store_true", help="only the reading vs bare rounds")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or tmp
        rows = run(args)

    def med(what, field):
        return statistics.median(r[field] for r in rows if r["what"] == what)

    print(
        f"reading {med('reading_vs_bare', 'reading_per_core'):.1f} samples/s/core, bare "
        f"{med('reading_vs_bare', 'bare_per_core'):.1f}, ratio {med('reading_vs_bare', 'ratio'):.3f}"
    )
    if args.pair_only:
        return
    print(
        f"JPEG {med('decode', 'jpeg_kb'):.1f} KB, {med('decode', 'jpeg_ms'):.2f} ms decode; "
        f"PNG {med('decode', 'png_kb'):.1f} KB, {med('decode', 'png_ms'):.2f} ms decode"
    )
    print(
        f"two views: PIL {med('augment_two_views', 'pil_ms'):.2f} ms, tensor "
        f"{med('augment_two_views', 'tensor_ms'):.2f} ms per sample"
    )
    if any(r["what"] == "device" for r in rows):
        print(f"device: {med('device', 'samples_per_s'):.0f} samples/s (decode_jpeg on CUDA + two views)")


if __name__ == "__main__":
    main()
