"""train/student_stage.student_step on CPU with plain torch modules (no DeepSpeed, no Ray): one step's losses
from a teacher whose codes are set by hand (logits = the first 8 pixels), two clusters (all +1, all −1)."""

from __future__ import annotations

import torch
from torch import nn

from brcd_dist.codes import probs_and_codes
from brcd_dist.config import Config
from brcd_dist.losses import KDInputs, cibhash_loss, kd_loss
from brcd_dist.train.state import Clustering
from brcd_dist.train.student_stage import student_step

BITS, PIXELS = 8, 16
KEYS = ["a", "b", "c", "d"]
PSEUDO = {"a": 0, "b": 0, "c": 1, "d": 1}
VIEW1_SIGNS = [1.0, 1.0, -1.0, -1.0]  # teacher codes all +1 or all −1: clusters 0, 0, 1, 1 (all = pseudo-labels)
VIEW2_SIGNS = [1.0, -1.0, -1.0, -1.0]  # clusters 0, 1, 1, 1: "b" lands in the other cluster


def first_pixels_teacher() -> nn.Module:
    """logits = the first BITS pixels of the flattened image."""
    lin = nn.Linear(PIXELS, BITS, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(BITS, PIXELS))
    return nn.Sequential(nn.Flatten(), lin)


def small_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, BITS))


def batch() -> dict:
    g = torch.Generator().manual_seed(1)

    def view(signs):
        x = torch.rand(len(signs), 1, 4, 4, generator=g) + 0.5  # |pixel| >= 0.5: the sign is set by `signs`
        return x * torch.tensor(signs).view(-1, 1, 1, 1)

    return {"view1": view(VIEW1_SIGNS), "view2": view(VIEW2_SIGNS), "key": KEYS}


def clustering() -> Clustering:
    centroids = torch.stack([torch.ones(BITS), -torch.ones(BITS)])
    masks = torch.ones(2, BITS)
    masks[1, :3] = 0
    return Clustering(
        centroids=centroids,
        masks=masks,
        agreement=torch.ones(2, BITS),
        counts=torch.tensor([2, 2]),
        pseudo_labels=PSEUDO,
        inertia=[0.0],
        n_mask_fallback=0,
        backend="torch",
    )


def config(kd_weight=0.5, lambda_self=2.0) -> Config:
    cfg = Config()
    cfg.brcd.kd_weight, cfg.brcd.lambda_self = kd_weight, lambda_self
    return cfg


def test_loss_is_weighted_kd_on_hand_built_inputs_plus_weighted_self_term():
    cfg, b, student = config(), batch(), small_student()
    out = student_step(b, first_pixels_teacher(), student, clustering(), cfg, torch.device("cpu"))

    t1 = torch.tensor(VIEW1_SIGNS).view(-1, 1).expand(-1, BITS)
    t2 = torch.tensor(VIEW2_SIGNS).view(-1, 1).expand(-1, BITS)
    p1, s1 = probs_and_codes(student(b["view1"]))
    p2, s2 = probs_and_codes(student(b["view2"]))
    inputs = KDInputs(
        s1=s1,
        s2=s2,
        p1=p1,
        p2=p2,
        t1=t1,
        t2=t2,
        labels=torch.tensor([0, 0, 1, 1]),
        view_clusters1=torch.tensor([0, 0, 1, 1]),
        view_clusters2=torch.tensor([0, 1, 1, 1]),
        masks=clustering().masks,
    )
    kd = kd_loss("brcd", inputs, cfg.brcd)
    own = cibhash_loss(p1, s1, p2, s2, tau=cfg.brcd.tau)
    torch.testing.assert_close(out["kd"], kd.detach())
    torch.testing.assert_close(out["self"], own.detach())
    torch.testing.assert_close(out["loss"], 0.5 * kd + 2.0 * own)


def test_offset_rate_is_the_share_of_views_whose_nearest_centroid_is_not_the_pseudo_label():
    out = student_step(batch(), first_pixels_teacher(), small_student(), clustering(), config(), torch.device("cpu"))
    assert float(out["offset_rate"]) == (0 / 4 + 1 / 4) / 2  # only view 2 of "b"


def test_gradient_reaches_the_student_and_not_the_teacher():
    teacher, student = first_pixels_teacher(), small_student()
    out = student_step(batch(), teacher, student, clustering(), config(), torch.device("cpu"))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_a_key_the_clustering_does_not_know_gets_its_first_views_nearest_centroid():
    """ "c" missing from the pseudo-labels (a shard changed since k-means): its label is view 1's nearest centroid
    (1), the same value the full dict holds, so the step's losses equal the full-dict step's; never a KeyError."""
    full = clustering()
    partial = Clustering(**{**full.__dict__, "pseudo_labels": {k: v for k, v in PSEUDO.items() if k != "c"}})
    args = (first_pixels_teacher(), small_student())
    want = student_step(batch(), *args, full, config(), torch.device("cpu"))
    got = student_step(batch(), *args, partial, config(), torch.device("cpu"))
    torch.testing.assert_close(got["loss"], want["loss"])
    torch.testing.assert_close(got["offset_rate"], want["offset_rate"])
