"""The KD-loss registry: every KD term the student can be trained with, by its config name (`brcd.kd`).

A KD term is a function `(KDInputs, BRCDConfig) -> scalar tensor`, unweighted (the caller multiplies by
`brcd.kd_weight`), registered where it is defined:

    @register_kd("my_baseline", needs=("q1", "q2"))
    def _my_baseline(x: KDInputs, cfg: BRCDConfig) -> torch.Tensor: ...

A new file in brcd_dist/losses/ is imported by the package (`losses/__init__.py` imports every module in it), so
adding a baseline touches that one file; config validation reads `kd_names()`. `needs` names the optional KDInputs
fields the term reads (a tuple, or a function of the BRCDConfig returning one); they are checked before it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from brcd_dist.config import BRCDConfig

Needs = Sequence[str] | Callable[["BRCDConfig"], Sequence[str]]
KDFunction = Callable[["KDInputs", "BRCDConfig"], torch.Tensor]


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


@dataclass(frozen=True)
class KDEntry:
    name: str
    fn: KDFunction
    needs: Needs = ()

    def required_fields(self, cfg: BRCDConfig) -> tuple[str, ...]:
        return tuple(self.needs(cfg) if callable(self.needs) else self.needs)


_REGISTRY: dict[str, KDEntry] = {}
# Listed first, in this order, in kd_names() and in error messages: the method, then the student alone.
_FIRST = ("brcd", "none")


def register_kd(name: str, needs: Needs = ()) -> Callable[[KDFunction], KDFunction]:
    """Decorator: register `fn` as the KD term `name`. A name registered twice raises (two files claiming it)."""

    def decorate(fn: KDFunction) -> KDFunction:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"register_kd: {name!r} is already registered by {_REGISTRY[name].fn.__module__}")
        _REGISTRY[name] = KDEntry(name, fn, needs)
        return fn

    return decorate


def kd_names() -> tuple[str, ...]:
    """Every registered KD term: brcd, none, then the baselines in alphabetical order."""
    first = [n for n in _FIRST if n in _REGISTRY]
    return (*first, *sorted(n for n in _REGISTRY if n not in _FIRST))


def kd_loss(name: str, inputs: KDInputs, brcd_cfg: BRCDConfig) -> torch.Tensor:
    """The KD term `name` (one of kd_names()) on one batch -> scalar, unweighted; "none" -> 0."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"kd_loss: unknown method {name!r}; allowed: {', '.join(kd_names())}")
    missing = [f for f in entry.required_fields(brcd_cfg) if getattr(inputs, f) is None]
    if missing:
        raise ValueError(f"kd_loss({name!r}) needs KDInputs.{', '.join(missing)}")
    return entry.fn(inputs, brcd_cfg)


@register_kd("none")
def _none(x: KDInputs, cfg: BRCDConfig) -> torch.Tensor:
    """The student alone: no KD term (its own CIBHash loss still applies)."""
    return x.s1.new_zeros(())


def per_view(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a1: torch.Tensor,
    a2: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """A single-batch loss applied to each view's batch separately and averaged over the two views."""
    return 0.5 * (loss(a1, b1) + loss(a2, b2))
