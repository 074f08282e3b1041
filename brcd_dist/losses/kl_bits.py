"""Hinton-style KD on bit probabilities: KL(teacher ‖ student) of the factorised Bernoulli code distributions.

The KL of a product of L independent Bernoullis is the sum of the per-bit KLs, so it is summed over bits and
averaged over rows (the same convention as CIBHash's KL term); no temperature (T = 1).
- kl_bits: the target is the teacher's bit probabilities q, a dense per-bit confidence no other method receives.
- kl_codes: the target is the teacher's binary code, q = (1 + t)/2 smoothed by ε towards ½:
  q_ε = (1 − ε)·(1 + t)/2 + ε/2 ∈ {ε/2, 1 − ε/2}, so it sees what BRCD sees (the ±1 codes) and no more.
"""

from __future__ import annotations

import torch

from brcd_dist.losses.cibhash import bernoulli_kl
from brcd_dist.losses.registry import KDInputs, per_view, register_kd

CODE_SMOOTHING = 0.1  # ε of kl_codes: the targets are 0.05 and 0.95


def kl_bits_loss(p_student: torch.Tensor, q_teacher: torch.Tensor) -> torch.Tensor:
    """Student and teacher bit probabilities (B, L) -> scalar KL(Bern(q) ‖ Bern(p)); 0 when p == q."""
    return bernoulli_kl(q_teacher.detach(), p_student)


def smoothed_code_targets(teacher_codes: torch.Tensor, eps: float = CODE_SMOOTHING) -> torch.Tensor:
    """±1 codes (B, L) -> Bernoulli targets (1 − ε)·(1 + t)/2 + ε/2."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"smoothed_code_targets: eps={eps!r}, allowed: 0 < eps < 1")
    return (1 - eps) * (1 + teacher_codes.detach()) / 2 + eps / 2


def kl_codes_loss(p_student: torch.Tensor, t_teacher: torch.Tensor, eps: float = CODE_SMOOTHING) -> torch.Tensor:
    """Student bit probabilities and teacher ±1 codes (B, L) -> scalar KL(Bern(q_ε) ‖ Bern(p))."""
    return bernoulli_kl(smoothed_code_targets(t_teacher, eps).to(p_student.dtype), p_student)


@register_kd("kl_bits", needs=("q1", "q2"))
def _kl_bits(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(kl_bits_loss, x.p1, x.p2, x.q1, x.q2)


@register_kd("kl_codes")
def _kl_codes(x: KDInputs, cfg) -> torch.Tensor:
    return per_view(kl_codes_loss, x.p1, x.p2, x.t1, x.t2)
