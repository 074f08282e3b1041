"""Individual-space KD baselines: pull each student code towards the teacher's code of the same image and view."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brcd_dist.losses.registry import KDInputs, per_view, register_kd


def individual_cos_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 − cos(student_i, teacher_i); (B, L), (B, L) -> scalar in [0, 2]."""
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=1)).mean()


def individual_l2_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per bit, mean over rows: ‖student_i − teacher_i‖² / L averaged over i.

    kd_loss feeds the relaxed student code 2p − 1 here: on ±1 codes this would be 2·(1 − cos), a copy of the above.
    """
    return F.mse_loss(student, teacher.detach())


@register_kd("individual_cos")
def _individual_cos(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(individual_cos_loss, x.s1, x.s2, x.t1, x.t2)


@register_kd("individual_l2")
def _individual_l2(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(individual_l2_loss, 2 * x.p1 - 1, 2 * x.p2 - 1, x.t1, x.t2)
