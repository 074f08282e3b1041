"""The paper's student regime on cached frozen-backbone features: KD methods compared on MLP hash heads.

A frozen backbone's forward pass costs ~60x its head's on CPU, and a frozen backbone gives the same output for the
same input, so this bench computes it once per image for a fixed set of augmented views and trains only heads:
1. cache: for each of the 5,000 training images, `views` augmented views (data.augment.TwoViews at epochs
   0..views/2-1, the pipeline's own augmentation) and the eval view; for a seeded database subset and for the val
   and test queries, the eval view. Each goes through the frozen ImageNet EfficientNet-Lite0
   (brcd_dist/pretrained.py) at 32 px (the student's input) and at 64 px (the same view upsampled: the teacher's
   input, so that teacher and student see different features). Stored as float16 in --cache, reused by later runs.
2. teacher: an MLP hash head on the 64 px features trained with the CIBHash loss on pairs of cached views; its codes
   of the training images give k-means pseudo-labels (K = 10) and bit masks (δ), as stage B does.
3. student, per method: an MLP hash head on the 32 px features (--head mlp: 1280 -> 1000 -> 1000 -> L on the pooled
   features; --head classifier_mlp: the paper's 1000 -> 1000 -> L on the frozen ImageNet classifier's logits, which
   is linear in the cached features, so it is applied to them once), Adam 1e-3, batch 64,
   kd_weight × KD + λ_self × CIBHash, two distinct cached views per image per epoch; validation SSHP mAP@1000
   every --eval-every epochs, best kept, early stop after --patience evaluations without improvement; the best
   head is scored on the test queries (SSHP, and ASHP against the teacher's database codes).
Departures from the DESIGN §3 protocol, to keep it cheap: a database subset (default 10,000 of 60,000), 1,000 of
each query split, `views` fixed views instead of fresh ones each epoch. One process, no Ray.

    nice .venv/bin/python bench/frozen_heads.py --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brcd_dist.clustering.bit_masks import bit_masks
from brcd_dist.clustering.kmeans import distributed_kmeans
from brcd_dist.clustering.pseudo_labels import assign_nearest
from brcd_dist.codes import probs_and_codes
from brcd_dist.config import BRCDConfig
from brcd_dist.data.augment import TwoViews, eval_batch
from brcd_dist.data.idx import load_fashion_mnist
from brcd_dist.data.splits import make_splits
from brcd_dist.losses import KDInputs, kd_loss
from brcd_dist.losses.cibhash import cibhash_loss
from brcd_dist.models import MLP_HIDDEN, create_backbone, hash_head
from brcd_dist.pretrained import TIMM_ARCH, efficientnet_lite0_state_dict
from brcd_dist.retrieval import mean_average_precision

# Row name -> BRCDConfig overrides (kd_weight 1, λ_self 1 and DESIGN's α, δ, K, τ: no tuning here).
METHODS = {
    "student_alone": {"kd": "none"},
    "brcd": {"kd": "brcd"},
    "brcd_no_mask": {"kd": "brcd", "bit_mask": False},
    "brcd_authors_code_masked": {"kd": "brcd", "mask_sides": "both", "cosine": "normalised", "negatives": "authors"},
    "brcd_authors_release": {
        "kd": "brcd",
        "mask_sides": "both",
        "cosine": "normalised",
        "negatives": "authors",
        "authors_release": True,
    },
    "kl_bits": {"kd": "kl_bits"},
    "kl_codes": {"kd": "kl_codes"},
    "distill_kl": {"kd": "distill_kl"},
}
BITS, FEATURE_BATCH = 64, 256
TOPK = 1000  # mAP@1000, or the database size if smaller


# ----------------------------------------------------------------------------- 1. the feature cache


def build_cache(args) -> dict:
    data = load_fashion_mnist(args.source)
    splits = make_splits(data["train_labels"], len(data["test_labels"]), train_per_class=500, val_fraction=0.5, seed=0)
    train = splits["train"][: args.train] if args.train else splits["train"]
    idx = {
        "train": train,
        "database": splits["database"][: args.database],
        "val_query": splits["val_query"][: args.queries],
        "test_query": splits["test_query"][: args.queries],
    }
    backbone, _ = create_backbone(TIMM_ARCH, in_chans=1, img_size=32)
    state = efficientnet_lite0_state_dict()
    state["conv_stem.weight"] = state["conv_stem.weight"].sum(dim=1, keepdim=True)  # 1 channel: sum of RGB filters
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    backbone.eval().requires_grad_(False)

    def features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            up = F.interpolate(x, size=args.teacher_px, mode="bilinear", align_corners=False)
            return backbone(x).half(), backbone(up).half()

    def encode(images: np.ndarray, make_batch) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = [], []
        for start in range(0, len(images), FEATURE_BATCH):
            chunk = [Image.fromarray(im, mode="L") for im in images[start : start + FEATURE_BATCH]]
            fs, ft = features(make_batch(chunk, start))
            s.append(fs)
            t.append(ft)
        return torch.cat(s), torch.cat(t)

    cache: dict = {"labels": {}, "student": {}, "teacher": {}}
    started = time.time()
    for split, source in (("train", "train"), ("database", "train"), ("val_query", "test"), ("test_query", "test")):
        images = data[f"{source}_images"][idx[split]]
        cache["labels"][split] = torch.as_tensor(data[f"{source}_labels"][idx[split]].astype(np.int64))
        cache["student"][split], cache["teacher"][split] = encode(images, lambda c, _: eval_batch(c, 32, 1))
    keys = [f"train_{i:05d}" for i in idx["train"]]
    images = data["train_images"][idx["train"]]
    views_s, views_t = [], []
    for epoch in range(args.views // 2):
        augment = TwoViews(32, 1, seed=0, epoch=epoch)
        for v in (0, 1):
            fs, ft = encode(images, lambda c, start, v=v, aug=augment: aug(c, keys[start : start + len(c)])[v])
            views_s.append(fs)
            views_t.append(ft)
    cache["student"]["views"], cache["teacher"]["views"] = torch.stack(views_s, 1), torch.stack(views_t, 1)
    cache["seconds"] = time.time() - started
    cache["made_with"] = cache_key(args)
    cache["images_encoded"] = sum(len(v) for v in idx.values()) + len(idx["train"]) * 2 * (args.views // 2)
    return cache


def cache_key(args) -> dict:
    key = {k: getattr(args, k) for k in ("source", "train", "views", "database", "queries")}
    if args.teacher_px != 64:  # caches made before --teacher-px existed are 64 px ones
        key["teacher_px"] = args.teacher_px
    return key


# ----------------------------------------------------------------------------- 2-3. heads


def view_pairs(n: int, views: int, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct cached view indices per image, drawn anew each epoch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    a = torch.randint(0, views, (n,), generator=g)
    b = (a + torch.randint(1, views, (n,), generator=g)) % views
    return a, b


def codes_of(head: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.where(head(feats.float()) >= 0, 1.0, -1.0)


def train_teacher(cache: dict, args) -> torch.nn.Module:
    """CIBHash on pairs of cached teacher views; `args.teacher_views` > 0 uses only the first that many views."""
    torch.manual_seed(1000 + args.seed)
    views = cache["teacher"]["views"]
    if args.teacher_views:
        views = views[:, : args.teacher_views]
    head = hash_head(views.shape[-1], args.bits, "mlp", hidden=args.teacher_hidden or MLP_HIDDEN)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    n, v = views.shape[:2]
    batch = args.teacher_batch or args.batch
    for epoch in range(args.teacher_epochs):
        a, b = view_pairs(n, v, epoch, 1000 + args.seed)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, n - batch + 1, batch):
            i = order[start : start + batch]
            p1, s1 = probs_and_codes(head(views[i, a[i]].float()))
            p2, s2 = probs_and_codes(head(views[i, b[i]].float()))
            loss = cibhash_loss(p1, s1, p2, s2, tau=args.teacher_tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def classifier_logits(cache: dict) -> dict:
    """The student's cached features mapped through Lite0's frozen ImageNet classifier (1280 -> 1000 logits)."""
    state = efficientnet_lite0_state_dict()
    weight, bias = state["classifier.weight"].float(), state["classifier.bias"].float()
    return {split: (feats.float() @ weight.T + bias).half() for split, feats in cache["student"].items()}


def train_student(cache: dict, teacher_out: dict, cfg: BRCDConfig, args) -> dict:
    torch.manual_seed(args.seed)
    s_views = cache["student"]["views"]
    n, v = s_views.shape[:2]
    head = hash_head(s_views.shape[-1], args.bits, args.head)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    labels_db = cache["labels"]["database"]
    best, best_state, bad, history = -1.0, None, 0, []
    for epoch in range(args.epochs):
        head.train()
        a, b = view_pairs(n, v, epoch, args.seed)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        for start in range(0, n - args.batch + 1, args.batch):
            i = order[start : start + args.batch]
            p1, s1 = probs_and_codes(head(s_views[i, a[i]].float()))
            p2, s2 = probs_and_codes(head(s_views[i, b[i]].float()))
            q1, q2 = teacher_out["q"][i, a[i]], teacher_out["q"][i, b[i]]
            t1, t2 = torch.where(q1 >= 0.5, 1.0, -1.0), torch.where(q2 >= 0.5, 1.0, -1.0)
            x = KDInputs(
                s1=s1,
                s2=s2,
                p1=p1,
                p2=p2,
                t1=t1,
                t2=t2,
                q1=q1,
                q2=q2,
                labels=teacher_out["pseudo"][i],
                view_clusters1=teacher_out["view_clusters"][i, a[i]],
                view_clusters2=teacher_out["view_clusters"][i, b[i]],
                masks=teacher_out["masks"],
            )
            loss = cfg.kd_weight * kd_loss(cfg.kd, x, cfg) + cfg.lambda_self * cibhash_loss(p1, s1, p2, s2, tau=cfg.tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
        last = epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_every == 0 or last:
            head.eval()
            val = mean_average_precision(
                codes_of(head, cache["student"]["val_query"]),
                codes_of(head, cache["student"]["database"]),
                cache["labels"]["val_query"],
                labels_db,
                TOPK,
            )
            history.append((epoch + 1, round(val, 4)))
            if val > best:
                best, best_state, bad = val, copy.deepcopy(head.state_dict()), 0
            else:
                bad += 1
                if bad >= args.patience:
                    break
    head.load_state_dict(best_state)
    head.eval()
    q = codes_of(head, cache["student"]["test_query"])
    labels_q = cache["labels"]["test_query"]
    return {
        "val_sshp_best": round(best, 4),
        "epochs_run": history[-1][0],
        "val_history": history,
        "test_sshp": round(
            mean_average_precision(q, codes_of(head, cache["student"]["database"]), labels_q, labels_db, TOPK), 4
        ),
        "test_ashp": round(mean_average_precision(q, teacher_out["db_codes"], labels_q, labels_db, TOPK), 4),
    }


def teacher_outputs(cache: dict, teacher: torch.nn.Module, args) -> tuple[dict, dict]:
    from sklearn.metrics import normalized_mutual_info_score

    with torch.no_grad():
        q = torch.sigmoid(teacher(cache["teacher"]["views"].float()))  # (N, V, L)
    train_codes = codes_of(teacher, cache["teacher"]["train"])
    km = distributed_kmeans(train_codes.numpy(), args.clusters, iters=25, seed=0)
    centroids = torch.as_tensor(km.centroids)
    pseudo = torch.as_tensor(km.assignments)
    masks, empty = bit_masks(train_codes, pseudo, args.clusters, args.delta)
    view_codes = torch.where(q >= 0.5, 1.0, -1.0)
    n, v, _ = view_codes.shape
    view_clusters = assign_nearest(view_codes.reshape(n * v, -1), centroids).reshape(n, v)
    db_codes = codes_of(teacher, cache["teacher"]["database"])
    labels_db = cache["labels"]["database"]
    report = {
        "teacher_val_map": round(
            mean_average_precision(
                codes_of(teacher, cache["teacher"]["val_query"]),
                db_codes,
                cache["labels"]["val_query"],
                labels_db,
                TOPK,
            ),
            4,
        ),
        "teacher_test_map": round(
            mean_average_precision(
                codes_of(teacher, cache["teacher"]["test_query"]),
                db_codes,
                cache["labels"]["test_query"],
                labels_db,
                TOPK,
            ),
            4,
        ),
        "cluster_nmi": round(float(normalized_mutual_info_score(cache["labels"]["train"], pseudo)), 4),
        "mask_bits_kept": [int(x) for x in masks.sum(dim=1).tolist()],
        "empty_masks": int(empty),
        "view_offset_rate": round(float((view_clusters != pseudo.unsqueeze(1)).float().mean()), 4),
    }
    return {"q": q, "pseudo": pseudo, "masks": masks, "view_clusters": view_clusters, "db_codes": db_codes}, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "brcd_frozen_lite0_cache.pt"))
    ap.add_argument("--views", type=int, default=4, help="cached augmented views per training image (even)")
    ap.add_argument("--train", type=int, default=0, help="first N of the 5,000 training images (0: all; smoke tests)")
    ap.add_argument("--database", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--teacher-px", type=int, default=64, help="the teacher's input: the 32 px view upsampled to this")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--teacher-tau", type=float, default=0.3, help="the teacher's CIBHash temperature")
    ap.add_argument("--teacher-batch", type=int, default=0, help="the teacher's batch (0: --batch)")
    ap.add_argument("--teacher-views", type=int, default=0, help="teacher: first N cached views (0: all)")
    ap.add_argument("--teacher-hidden", type=int, default=0, help="teacher hidden width (0: hash_head mlp)")
    ap.add_argument("--bits", type=int, default=BITS, help="code length of teacher and students")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--delta", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--head", default="mlp", choices=["mlp", "classifier_mlp"], help="the students' head (models.py)")
    ap.add_argument("--out", default="bench/results/frozen_heads.jsonl")
    args = ap.parse_args()
    if args.views < 2 or args.views % 2:
        ap.error(f"--views={args.views}: must be an even number >= 2")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    global TOPK
    TOPK = min(TOPK, args.database)
    cache_path = Path(args.cache)
    if cache_path.is_file():
        cache = torch.load(cache_path, weights_only=True)
    else:
        cache = build_cache(args)
        torch.save(cache, cache_path)
    if cache["made_with"] != cache_key(args):
        sys.exit(f"--cache {cache_path} was made with {cache['made_with']}, not {cache_key(args)}: use another path")
    print(f"feature cache: {cache['images_encoded']} images x 2 resolutions in {cache['seconds']:.0f} s", flush=True)
    started = time.time()
    teacher = train_teacher(cache, args)
    teacher_out, report = teacher_outputs(cache, teacher, args)
    report["teacher_seconds"] = round(time.time() - started, 1)
    print(json.dumps({"teacher": report}), flush=True)
    if args.head == "classifier_mlp":
        cache["student"] = classifier_logits(cache)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods.split(","):
        cfg = BRCDConfig(**METHODS[name], delta=args.delta, clusters=args.clusters, bits=args.bits)
        started = time.time()
        row = {
            "method": name,
            "seed": args.seed,
            **train_student(cache, teacher_out, cfg, args),
            "seconds": round(time.time() - started, 1),
            "teacher": report,
            "setup": {
                k: getattr(args, k)
                for k in (
                    "train",
                    "views",
                    "database",
                    "queries",
                    "teacher_epochs",
                    "teacher_tau",
                    "teacher_batch",
                    "teacher_views",
                    "teacher_hidden",
                    "teacher_px",
                    "bits",
                    "epochs",
                    "eval_every",
                    "patience",
                    "batch",
                    "head",
                )
            },
        }
        print(json.dumps({k: v for k, v in row.items() if k != "teacher"}), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
