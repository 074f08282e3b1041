"""CRD baseline (Tian et al., ICLR 2020) with in-batch negatives instead of a memory bank and NCE.

Row i: anchor student_i, positive teacher_i, negatives teacher_j (j != i) of the same batch; cosine / τ logits,
cross-entropy. Student and teacher codes share the L-bit space, so CRD's projection heads are not needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brcd_dist.losses.registry import KDInputs, per_view, register_kd


def crd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, L), (B, L) -> scalar: mean over rows of −log softmax_j(cos(student_i, teacher_j)/τ)[i]."""
    logits = F.normalize(student, dim=1) @ F.normalize(teacher.detach(), dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(student.shape[0], device=student.device))


@register_kd("crd")
def _crd(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(lambda s, t: crd_loss(s, t, cfg.tau), x.s1, x.s2, x.t1, x.t2)
