"""How strongly each KD term pulls on the student, next to the student's own CIBHash term: the norm of the
gradient of each term alone on the student's logits, on real batches, student at its seeded init (where a short
benchmark schedule spends its first steps). Every term enters the student's loss with the same weight
(brcd.kd_weight), so these norms are the terms' effective weights.

The pieces are the pipeline's own: the config's student, a teacher checkpoint, the paper's augmentations
(throughput.in_memory_views), k-means on the teacher's codes of the training subset (distributed_kmeans, one
process), masks at the config's delta (bit_masks), nearest-centroid view clusters, `kd_loss`, `cibhash_loss`.

    python bench/kd_scale.py --teacher data/teachers/gpu-teacher64.pt [--batches 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from throughput import in_memory_views  # noqa: E402

from brcd_dist.clustering.bit_masks import bit_masks  # noqa: E402
from brcd_dist.clustering.kmeans import distributed_kmeans  # noqa: E402
from brcd_dist.clustering.pseudo_labels import assign_nearest  # noqa: E402
from brcd_dist.codes import probs_and_codes  # noqa: E402
from brcd_dist.config import KD_METHODS, load_config  # noqa: E402
from brcd_dist.data.augment import eval_batch  # noqa: E402
from brcd_dist.data.idx import load_fashion_mnist  # noqa: E402
from brcd_dist.data.splits import train_subset  # noqa: E402
from brcd_dist.losses import KDInputs, kd_loss  # noqa: E402
from brcd_dist.losses.cibhash import cibhash_loss  # noqa: E402
from brcd_dist.models import build_student, load_hash_model  # noqa: E402

SELF = "CIBHash (student's own term)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--teacher", required=True, help="hash-model checkpoint")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(1)
    teacher = load_hash_model(args.teacher).eval()
    b, k = cfg.train.batch_size, cfg.brcd.clusters
    n = b * args.batches
    # Clusters from the teacher's codes of the whole training subset (deterministic views, as stage B).
    arrays = load_fashion_mnist(cfg.data.source_path)
    idx = train_subset(arrays["train_labels"], cfg.data.train_per_class, cfg.data.split_seed)
    with torch.no_grad():
        codes = torch.cat(
            [
                probs_and_codes(
                    teacher(
                        eval_batch(
                            [Image.fromarray(arrays["train_images"][i], mode="L") for i in idx[s : s + 500]],
                            cfg.data.image_size,
                            cfg.data.in_chans,
                        )
                    )
                )[1]
                for s in range(0, len(idx), 500)
            ]
        )
    km = distributed_kmeans(codes.numpy(), k, iters=cfg.kmeans.iters, tol=cfg.kmeans.tol, seed=cfg.kmeans.seed)
    pseudo = dict(zip((f"train-{i:05d}" for i in idx), km.assignments.tolist()))
    masks, _ = bit_masks(codes, torch.as_tensor(km.assignments), k, cfg.brcd.delta)
    centroids = torch.as_tensor(km.centroids)
    print(f"k-means K={k}: bits kept per cluster at delta={cfg.brcd.delta}: {masks.sum(1).int().tolist()}")

    v1, v2, keys = in_memory_views(cfg, n)
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg).train()
    terms = [SELF, *[m for m in KD_METHODS if m != "none"]]
    sums = {t: np.zeros(2) for t in terms}
    for i in range(args.batches):
        sl = slice(i * b, (i + 1) * b)
        with torch.no_grad():
            q, t = probs_and_codes(teacher(torch.cat([v1[sl], v2[sl]])))
        labels = torch.tensor([pseudo[key] for key in keys[sl]])
        vc = assign_nearest(t, centroids, spherical=cfg.kmeans.spherical)
        for term in terms:
            logits = student(torch.cat([v1[sl], v2[sl]]))
            logits.retain_grad()
            p, s = probs_and_codes(logits)
            if term == SELF:
                loss = cibhash_loss(p[:b], s[:b], p[b:], s[b:], tau=cfg.brcd.tau)
            else:
                x = KDInputs(
                    s1=s[:b],
                    s2=s[b:],
                    p1=p[:b],
                    p2=p[b:],
                    t1=t[:b],
                    t2=t[b:],
                    q1=q[:b],
                    q2=q[b:],
                    labels=labels,
                    view_clusters1=vc[:b],
                    view_clusters2=vc[b:],
                    masks=masks,
                )
                loss = kd_loss(term, x, cfg.brcd)
            student.zero_grad(set_to_none=True)
            loss.backward()
            sums[term] += [loss.item(), logits.grad.norm().item()]
    out = {term: (v[0] / args.batches, v[1] / args.batches) for term, v in sums.items()}
    print(f"\n{args.batches} batches of {b}; gradient of each term alone on the student's logits (2B x L)")
    print("| term | loss | gradient norm | / own term |\n|---|---|---|---|")
    for term, (loss, grad) in out.items():
        print(f"| {term} | {loss:.3f} | {grad:.4f} | {grad / out[SELF][1]:.2f} |")
    return out


if __name__ == "__main__":
    main()
