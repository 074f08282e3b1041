"""GPU checks in one short run, for a single-GPU machine that has torch and timm but not Ray or DeepSpeed.

1. NCCL + k-means: a 1-rank NCCL process group, `distributed_kmeans` with the torch-cuda assignment backend on
   1M x 256 float32, k = 20,000 (FAISS GPU wheels are not on that machine), and one nearest-centroid pass alone.
2. 224 px, the ImageNet-100 config's models (ViT-B/16 teacher, EfficientNet-B0 student), random init:
   (a) the bare BRCD + CIBHash step (throughput.bare_rate) on random views, fp32 and bf16 autocast;
   (b) encode images/s of student vs teacher, fp32 and bf16 (throughput.encode_rates).
3. A teacher recipe probe: CIBHash resnet18 teachers (1 x 32 x 32, linear head, AdamW 1e-3, tau 0.3) trained
   from scratch on all 60,000 unlabeled Fashion-MNIST training images with the paper's augmentations done on
   the GPU (random resized crop (0.5, 1), flip, brightness/contrast 0.4 with p 0.7: brcd_dist.data.augment's
   recipe for one channel at 32 px, drawn per image), bf16 autocast; mAP@1000 of 5k test queries x 60k database
   (DESIGN section 3, eval images made by augment.eval_batch) at a few epochs. Each teacher is written as a
   hash-model checkpoint with fp16 weights, split into parts under 15 MB (the device tool's file limit):
   `cat teacher64.pt.part* > teacher64.pt` rebuilds a file that `load_hash_model` reads.

    python bench/gpu.py --out OUTDIR                       # on the GPU machine
    python bench/gpu.py --out OUT --smoke                 # tiny sizes, CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from brcd_dist.codes import probs_and_codes  # noqa: E402
from brcd_dist.config import load_config  # noqa: E402
from brcd_dist.models import CHECKPOINT_FORMAT, HashModel  # noqa: E402

PART_BYTES = 15 * 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. NCCL + k-means


def kmeans_check(device: torch.device, n: int, d: int, k: int, iters: int) -> dict:
    from brcd_dist.clustering.kmeans import distributed_kmeans
    from brcd_dist.clustering.pseudo_labels import assign_nearest

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, d, device=device, generator=g)
        t = torch.ones(1 << 20, device=device)
        dist.all_reduce(t)
        sync(device)
        t0 = time.perf_counter()
        res = distributed_kmeans(
            x,
            k,
            iters=iters,
            tol=0.0,
            seed=0,
            init="random",
            backend="torch-cuda" if device.type == "cuda" else "torch-cpu",
        )
        sync(device)
        wall = time.perf_counter() - t0
        c = torch.as_tensor(res.centroids, device=device)
        assign_nearest(x[:1000], c)
        sync(device)
        t0 = time.perf_counter()
        labels = assign_nearest(x, c)
        sync(device)
        assign_s = time.perf_counter() - t0
        agree = float((labels.cpu().numpy() == res.assignments).mean())
    finally:
        dist.destroy_process_group()
    out = {
        "process_group": backend,
        "n": n,
        "d": d,
        "k": k,
        "iterations": res.iterations,
        "wall_s": wall,
        "s_per_iteration": wall / max(res.iterations, 1),
        "assign_pass_s": assign_s,
        "assign_points_per_s": n / assign_s,
        "labels_agree_with_final_pass": agree,
        "backend": res.backend,
    }
    log(f"k-means: {out}")
    return out


# ----------------------------------------------------------------------------- 2. 224 px throughput


def throughput_224(device: torch.device, batch: int, steps: int, encode_batch: int, smoke: bool) -> dict:
    from throughput import IMAGENET_PAIRS, bare_rate, encode_rates

    teacher, students, size, chans = IMAGENET_PAIRS
    if smoke:
        size = 32
    cfg = load_config(
        "configs/imagenet100_vitb16_effb0.yaml",
        [
            f"train.batch_size={batch}",
            f"data.image_size={size}",
            "teacher.pretrained=false",
            "student.pretrained=false",
        ],
        validate=False,
    )
    out: dict = {"batch": batch, "steps": steps, "teacher": teacher, "student": students[0], "size": size}
    n = batch * (steps + 3)
    g = torch.Generator().manual_seed(0)
    views = (
        torch.randn(n, chans, size, size, generator=g),
        torch.randn(n, chans, size, size, generator=g),
        [f"k{i}" for i in range(n)],
    )
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        rate = bare_rate(cfg, steps=steps, warmup=3, threads=8, device=device, views=views, amp=amp)
        out[f"train_{name}_images_per_s"] = rate
        log(f"bare BRCD step {size}px {name}: {rate:.1f} img/s")
        rates = encode_rates(
            teacher, students, size, chans, batch=encode_batch, batches=2, repeats=5, threads=8, device=device, amp=amp
        )
        out[f"encode_{name}"] = rates
        log(f"encode {size}px {name}: {rates}, student/teacher x{rates[students[0]] / rates[teacher]:.2f}")
    return out


# ----------------------------------------------------------------------------- 3. teacher recipe


def fashion_protocol(cfg) -> dict:
    """Raw uint8 images of the 60k database (= training images) and the 5k test queries, eval tensors, labels."""
    from PIL import Image

    from brcd_dist.data.augment import eval_batch
    from brcd_dist.data.idx import load_fashion_mnist
    from brcd_dist.data.splits import make_splits

    d = cfg.data
    arrays = load_fashion_mnist(d.source_path)
    s = make_splits(
        arrays["train_labels"],
        len(arrays["test_labels"]),
        train_per_class=d.train_per_class,
        val_fraction=d.val_fraction,
        seed=d.split_seed,
    )

    def evals(images: np.ndarray) -> torch.Tensor:
        return torch.cat(
            [
                eval_batch([Image.fromarray(im, mode="L") for im in images[i : i + 4096]], d.image_size, d.in_chans)
                for i in range(0, len(images), 4096)
            ]
        )

    db, q = s["database"], s["test_query"]
    return {
        "train_raw": torch.from_numpy(arrays["train_images"][db]),
        "db_eval": evals(arrays["train_images"][db]),
        "db_labels": arrays["train_labels"][db],
        "q_eval": evals(arrays["test_images"][q]),
        "q_labels": arrays["test_labels"][q],
    }


def gpu_views(raw: torch.Tensor, size: int, gen: torch.Generator, crop_min: float = 0.5) -> torch.Tensor:
    """The paper's view for one channel at 32 px, per image on the GPU: random resized crop (area crop_min-1, ratio
    3/4-4/3), horizontal flip p 0.5, brightness and contrast factors in [0.6, 1.4] with p 0.7, mean/std 0.5."""
    b, dev = raw.shape[0], raw.device
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, device=dev, generator=gen)  # noqa: E731
    x = raw.float().unsqueeze(1) / 255.0
    area, log_r = u(crop_min, 1.0), u(math.log(3 / 4), math.log(4 / 3))
    w, h = (area * log_r.exp()).sqrt().clamp(max=1.0), (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx, cy = u(-1, 1) * (1 - w), u(-1, 1) * (1 - h)
    flip = torch.where(torch.rand(b, device=dev, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, (b, 1, size, size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = (torch.rand(b, device=dev, generator=gen) < 0.7).float().view(b, 1, 1, 1)
    bright = 1 + jitter * (u(0.6, 1.4).view(b, 1, 1, 1) - 1)
    contrast = 1 + jitter * (u(0.6, 1.4).view(b, 1, 1, 1) - 1)
    x = (x * bright).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    return (x - 0.5) / 0.5


def encode_all(model: HashModel, x: torch.Tensor, device: torch.device, amp: bool) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(x), 4096):
            logits = model(x[i : i + 4096].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
            out.append(probs_and_codes(logits.float())[1])  # sign(σ(l) − ½), as the pipeline encodes
    model.train()
    return torch.cat(out)


def write_parts(model: HashModel, path: Path) -> list[str]:
    """A load_hash_model checkpoint with fp16 weights, in parts of at most PART_BYTES."""
    state = {
        k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "spec": model.spec, "state_dict": state}, buf)
    data, names = buf.getvalue(), []
    for i in range(0, len(data), PART_BYTES):
        name = f"{path.name}.part{i // PART_BYTES}"
        (path.parent / name).write_bytes(data[i : i + PART_BYTES])
        names.append(name)
    return names


def teacher_recipe(
    device: torch.device,
    data: dict,
    bits: int,
    epochs: int,
    eval_at: list[int],
    batch: int,
    lr: float,
    out_dir: Path,
    seed: int = 0,
    arch: str = "resnet18",
    size: int = 32,
    crop_min: float = 0.5,
    save: bool = True,
) -> dict:
    from brcd_dist.losses.cibhash import cibhash_loss
    from brcd_dist.retrieval import mean_average_precision

    torch.manual_seed(seed)
    model = HashModel(arch, bits, 1, size).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    raw = data["train_raw"].to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    amp = device.type == "cuda"
    curve, t_train = [], 0.0
    n = len(raw)
    for epoch in range(1, epochs + 1):
        sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device, generator=gen)
        for i in range(0, n - batch + 1, batch):
            xb = raw[perm[i : i + batch]]
            v = torch.cat([gpu_views(xb, size, gen, crop_min), gpu_views(xb, size, gen, crop_min)]).contiguous(
                memory_format=torch.channels_last
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(v)
            p, s = probs_and_codes(logits.float())
            loss = cibhash_loss(p[:batch], s[:batch], p[batch:], s[batch:], tau=0.3)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        t_train += time.perf_counter() - t0
        if epoch in eval_at:
            db = encode_all(model, data["db_eval"], device, amp)
            q = encode_all(model, data["q_eval"], device, amp)
            m = mean_average_precision(q, db, data["q_labels"], data["db_labels"], 1000)
            curve.append({"epoch": epoch, "map@1000": m, "train_s": t_train, "loss": loss.item()})
            log(
                f"teacher {arch} {bits} bits epoch {epoch}: mAP@1000 {m:.4f}, {t_train:.0f} s of training, "
                f"{2 * n * epoch / t_train:.0f} views/s"
            )
    parts = write_parts(model, out_dir / f"teacher{bits}.pt") if save else []
    return {
        "arch": arch,
        "bits": bits,
        "batch": batch,
        "lr": lr,
        "epochs": epochs,
        "images": n,
        "size": size,
        "crop_min": crop_min,
        "curve": curve,
        "parts": parts,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    ap.add_argument("--bits", type=int, nargs="+", default=[64, 32, 16])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[5, 10, 20, 30])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--budget-s", type=float, default=420, help="skip the teachers that would end past this")
    ap.add_argument("--fashion-dir", default="")
    ap.add_argument("--image-size", type=int, default=32, help="teacher input size (Fashion-MNIST is 28 px)")
    ap.add_argument("--crop-min", type=float, default=0.5, help="smallest crop area of the training views")
    ap.add_argument("--no-save", action="store_true", help="do not write the teacher checkpoints")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kmeans", "throughput", "teacher"])
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    log(f"device {report['device']}, torch {torch.__version__}")

    def save() -> None:
        (out_dir / "gpu_report.json").write_text(json.dumps(report, indent=1))

    if "kmeans" not in args.skip:
        report["kmeans"] = kmeans_check(device, *((20_000, 32, 200, 3) if args.smoke else (1_000_000, 256, 20_000, 25)))
        save()
    if "throughput" not in args.skip:
        report["throughput_224"] = throughput_224(
            device,
            batch=4 if args.smoke else 64,
            steps=2 if args.smoke else 20,
            encode_batch=8 if args.smoke else 256,
            smoke=args.smoke,
        )
        save()
    if "teacher" not in args.skip:
        overrides = [f"data.source_path={args.fashion_dir}"] if args.fashion_dir else []
        overrides.append(f"data.image_size={args.image_size}")
        cfg = load_config("configs/fashion_mnist.yaml", overrides, validate=False)
        data = fashion_protocol(cfg)
        if args.smoke:
            data = {
                "train_raw": data["train_raw"][:512],
                "db_eval": data["db_eval"][:2000],
                "db_labels": data["db_labels"][:2000],
                "q_eval": data["q_eval"][:200],
                "q_labels": data["q_labels"][:200],
            }
        report["teachers"] = []
        for bits in args.bits:
            elapsed = time.perf_counter() - t_start
            done = report["teachers"]
            per = done[-1]["curve"][-1]["train_s"] * 1.15 if done and done[-1]["curve"] else 0.0
            if elapsed + per > args.budget_s:
                log(f"skipping the {bits}-bit teacher: {elapsed:.0f} s spent, about {per:.0f} s more needed")
                continue
            report["teachers"].append(
                teacher_recipe(
                    device,
                    data,
                    bits,
                    args.epochs,
                    args.eval_at,
                    args.batch,
                    args.lr,
                    out_dir,
                    size=args.image_size,
                    crop_min=args.crop_min,
                    save=not args.no_save,
                )
            )
            save()
    report["wall_s"] = time.perf_counter() - t_start
    save()
    log(f"done in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
