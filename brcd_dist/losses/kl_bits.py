"""Hinton-style KD on bit probabilities: KL(teacher ‖ student) of the factorised Bernoulli code distributions.

The KL of a product of L independent Bernoullis is the sum of the per-bit KLs, so it is summed over bits and
averaged over rows (the same convention as CIBHash's KL term); no temperature (T = 1).
"""
from __future__ import annotations

import torch

from brcd_dist.losses.cibhash import bernoulli_kl


def kl_bits_loss(p_student: torch.Tensor, q_teacher: torch.Tensor) -> torch.Tensor:
    """Student and teacher bit probabilities (B, L) -> scalar KL(Bern(q) ‖ Bern(p)); 0 when p == q."""
    return bernoulli_kl(q_teacher.detach(), p_student)
