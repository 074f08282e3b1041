"""CIBHash loss (Qiu et al., IJCAI 2021, "Unsupervised Hashing with Contrastive Information Bottleneck").

L = NT-Xent(s1, s2; τ) + kl_weight · ½ (KL(p1 ‖ sg p2) + KL(p2 ‖ sg p1)): the teacher's own training loss and the
student's L_self (DESIGN §2). As in the authors' code, the second argument of each Bernoulli KL is detached, the KL
is summed over bits and averaged over the batch, and log terms carry ε = 1e-8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR NT-Xent: 2B rows; row i's positive is the other view of image i, every other row but itself a negative."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / tau).masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, targets)


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p) ‖ Bern(q)) summed over bits, averaged over rows: (B, L), (B, L) -> scalar."""
    kl = p * (torch.log(p + _EPS) - torch.log(q + _EPS)) + (1 - p) * (torch.log(1 - p + _EPS) - torch.log(1 - q + _EPS))
    return kl.sum(dim=1).mean()


def cibhash_loss(
    p1: torch.Tensor, s1: torch.Tensor, p2: torch.Tensor, s2: torch.Tensor, tau: float = 0.3, kl_weight: float = 0.001
) -> torch.Tensor:
    """p = bit probabilities, s = ±1 codes (STE) of views 1 and 2, each (B, L) -> scalar."""
    kl = 0.5 * (bernoulli_kl(p1, p2.detach()) + bernoulli_kl(p2, p1.detach()))
    return nt_xent_loss(s1, s2, tau) + kl_weight * kl
