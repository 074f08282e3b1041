"""The paper's KD baseline (He et al. 2024, the authors' `DistillKL`; Hinton et al. 2015): a softmax over the L
entries of each ±1 code at temperature T = 4, KL(teacher ‖ student) summed over entries, averaged over rows, × T².

Both sides are ±1 codes (the student's through the STE), so each softmax spreads mass over the code's +1 entries
against its −1 entries, e^{±1/T}: a weak, near-uniform target whose only information is which bits are +1. The
authors apply it to view 1 only; here, like every single-batch baseline, it is averaged over the two views (the
same expectation, half the variance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brcd_dist.losses.registry import KDInputs, per_view, register_kd

TEMPERATURE = 4.0  # the authors' DistillKL(T=4)


def distill_kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """(B, L), (B, L) -> scalar: T² · mean_i KL(softmax(t_i/T) ‖ softmax(s_i/T)); 0 when student == teacher."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher.detach().to(student.dtype) / temperature, dim=1)
    kl = F.kl_div(log_p_student, p_teacher, reduction="sum") / student.shape[0]
    return kl * temperature**2


@register_kd("distill_kl")
def _distill_kl(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(distill_kl_loss, x.s1, x.s2, x.t1, x.t2)
