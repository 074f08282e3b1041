"""Relational KD baselines: match the geometry of the batch rather than each code.

- RKD (Park et al., CVPR 2019): distance term (pairwise distances over their mean positive distance) and angle term
  (cosines of angles in every triplet), each a smooth-L1 between student and teacher; weights 25 and 50 as published.
- PKT (Passalis & Tefas, ECCV 2018): cosine kernel shifted to [0, 1], rows normalised to conditional probabilities,
  KL(teacher ‖ student) averaged over all B² entries (eps 1e-7), as in the authors' code.
- SP (Tung & Mori, ICCV 2019): row-L2-normalised Gram matrices, squared Frobenius difference / B².
Each takes one batch of student and teacher embeddings (B, L); the teacher side is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brcd_dist.losses.registry import KDInputs, per_view, register_kd


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances over their mean positive distance (RKD eq. 4)."""
    # Exact mode: identical codes get distance 0 exactly, where cdist's backward gives a zero (not NaN) gradient.
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    positive = d > 0
    mean = (d * positive).sum() / positive.sum().clamp_min(1)
    return d / mean.clamp_min(1e-12)


def _triplet_angles(x: torch.Tensor) -> torch.Tensor:
    """cos ∠(x_i, x_j, x_k) at vertex j for all (j, i, k), flattened (RKD eq. 6); (B, B, L) memory."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[j, i] = x_i − x_j
    norm = torch.linalg.vector_norm(diff, dim=2, keepdim=True)
    # Equal codes (common for ±1 codes) give a zero difference: unit vector 0 and zero gradient, where
    # F.normalize's eps would give a 1/eps gradient.
    nonzero = norm > 0
    e = diff * (nonzero / torch.where(nonzero, norm, torch.ones_like(norm)))
    return torch.bmm(e, e.transpose(1, 2)).reshape(-1)


def rkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> torch.Tensor:
    teacher = teacher.detach()
    distance = F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher))
    angle = F.smooth_l1_loss(_triplet_angles(student), _triplet_angles(teacher))
    return distance_weight * distance + angle_weight * angle


def _pkt_conditional(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=1)
    kernel = (x @ x.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    ps, pt = _pkt_conditional(student), _pkt_conditional(teacher.detach())
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    gs = F.normalize(student @ student.T, dim=1)
    gt = F.normalize(teacher.detach() @ teacher.detach().T, dim=1)
    return ((gs - gt) ** 2).sum() / student.shape[0] ** 2


@register_kd("rkd")
def _rkd(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(rkd_loss, x.s1, x.s2, x.t1, x.t2)


@register_kd("pkt")
def _pkt(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(pkt_loss, x.s1, x.s2, x.t1, x.t2)


@register_kd("sp")
def _sp(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(sp_loss, x.s1, x.s2, x.t1, x.t2)
