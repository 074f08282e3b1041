"""Student KD losses behind one call: kd_loss(name, KDInputs, BRCDConfig) for every name in config.KD_METHODS.

What each baseline compares (student side; the teacher side is always the teacher's ±1 codes t, except kl_bits):
- individual_cos, rkd, pkt, sp, crd: the student's ±1 codes s (STE gradient), like BRCD itself, so that a baseline
  differs from BRCD only in its objective;
- individual_l2: the relaxed code 2p − 1 (on ±1 codes L2 is 2·(1 − cos), i.e. individual_cos again);
- kl_bits: the bit probabilities p against the teacher's q.
Single-batch baselines are applied to each view's batch separately and averaged over the two views.
The returned value is unweighted: the caller multiplies by brcd_cfg.kd_weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from brcd_dist.config import KD_METHODS, BRCDConfig
from brcd_dist.losses.brcd import brcd_loss
from brcd_dist.losses.cibhash import cibhash_loss
from brcd_dist.losses.crd import crd_loss
from brcd_dist.losses.individual import individual_cos_loss, individual_l2_loss
from brcd_dist.losses.kl_bits import kl_bits_loss
from brcd_dist.losses.relational import pkt_loss, rkd_loss, sp_loss

__all__ = ["KDInputs", "kd_loss", "brcd_loss", "cibhash_loss", "crd_loss", "individual_cos_loss",
           "individual_l2_loss", "kl_bits_loss", "pkt_loss", "rkd_loss", "sp_loss"]


@dataclass
class KDInputs:
    """One two-view batch. s/t: student/teacher ±1 codes (B, L); p/q: student/teacher bit probabilities (B, L).
    labels: pseudo-labels c(i) (B,); view_clusters1/2: nearest-centroid cluster of t1/t2 (B,); masks: (K, L).
    Fields after t2 are only needed by the losses that use them (q: kl_bits; the rest: brcd)."""
    s1: torch.Tensor
    s2: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor
    t1: torch.Tensor
    t2: torch.Tensor
    q1: torch.Tensor | None = None
    q2: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    view_clusters1: torch.Tensor | None = None
    view_clusters2: torch.Tensor | None = None
    masks: torch.Tensor | None = None


def _require(x: KDInputs, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(x, f) is None]
    if missing:
        raise ValueError(f"kd_loss({name!r}) needs KDInputs.{', '.join(missing)}")


def kd_loss(name: str, inputs: KDInputs, brcd_cfg: BRCDConfig) -> torch.Tensor:
    """The KD term `name` (one of config.KD_METHODS) on one batch -> scalar; "none" -> 0."""
    x = inputs
    if name not in KD_METHODS:
        raise ValueError(f"kd_loss: unknown method {name!r}; allowed: {', '.join(KD_METHODS)}")
    if name == "none":
        return x.s1.new_zeros(())
    if name == "brcd":
        _require(x, name, "labels", "view_clusters1", "view_clusters2", *(["masks"] if brcd_cfg.bit_mask else []))
        return brcd_loss(x.s1, x.s2, x.t1, x.t2, x.labels, x.view_clusters1, x.view_clusters2, x.masks,
                         alpha=brcd_cfg.alpha, tau=brcd_cfg.tau, structural=brcd_cfg.structural,
                         cluster_removal=brcd_cfg.cluster_removal, bit_mask=brcd_cfg.bit_mask)
    if name == "kl_bits":
        _require(x, name, "q1", "q2")
        return 0.5 * (kl_bits_loss(x.p1, x.q1) + kl_bits_loss(x.p2, x.q2))
    if name == "individual_l2":
        return 0.5 * (individual_l2_loss(2 * x.p1 - 1, x.t1) + individual_l2_loss(2 * x.p2 - 1, x.t2))
    per_view = {
        "individual_cos": individual_cos_loss,
        "rkd": rkd_loss,
        "pkt": pkt_loss,
        "sp": sp_loss,
        "crd": lambda s, t: crd_loss(s, t, brcd_cfg.tau),
    }[name]
    return 0.5 * (per_view(x.s1, x.t1) + per_view(x.s2, x.t2))
