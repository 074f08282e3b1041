"""Student KD losses behind one call: kd_loss(name, KDInputs, BRCDConfig) for every name in kd_names().

Each KD term registers itself with `@register_kd("name")` (registry.py) in the module that defines it; this package
imports every module in it, so a new baseline is one new file here, and config validation lists it at once.

What each baseline compares (student side; the teacher side is always the teacher's ±1 codes t, except kl_bits):
- individual_cos, rkd, pkt, sp, crd, distill_kl: the student's ±1 codes s (STE gradient), like BRCD itself, so that
  a baseline differs from BRCD only in its objective;
- individual_l2: the relaxed code 2p − 1 (on ±1 codes L2 is 2·(1 − cos), i.e. individual_cos again);
- kl_bits: the bit probabilities p against the teacher's q; kl_codes: p against the teacher's ±1 codes, smoothed.
Single-batch baselines are applied to each view's batch separately and averaged over the two views.
The returned value is unweighted: the caller multiplies by brcd_cfg.kd_weight.
"""

from __future__ import annotations

import importlib
import pkgutil

from brcd_dist.losses.brcd import brcd_loss
from brcd_dist.losses.cibhash import cibhash_loss
from brcd_dist.losses.crd import crd_loss
from brcd_dist.losses.distill_kl import distill_kl_loss
from brcd_dist.losses.individual import individual_cos_loss, individual_l2_loss
from brcd_dist.losses.kl_bits import kl_bits_loss, kl_codes_loss
from brcd_dist.losses.registry import KDInputs, kd_loss, kd_names, register_kd
from brcd_dist.losses.relational import pkt_loss, rkd_loss, sp_loss

# Import every module of the package, so that a new file's @register_kd runs with no edit here (timm's pattern).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "KDInputs",
    "brcd_loss",
    "cibhash_loss",
    "crd_loss",
    "distill_kl_loss",
    "individual_cos_loss",
    "individual_l2_loss",
    "kd_loss",
    "kd_names",
    "kl_bits_loss",
    "kl_codes_loss",
    "pkt_loss",
    "register_kd",
    "rkd_loss",
    "sp_loss",
]
