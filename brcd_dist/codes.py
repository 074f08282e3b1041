"""±1 hash codes: sign with a straight-through gradient, bit packing, Hamming and cosine similarity (DESIGN §2).

For ±1 codes of L bits, cos(a, b) = a·b / L = 1 − 2·hamming(a, b) / L, so cosine similarity is Hamming similarity.
"""

from __future__ import annotations

import numpy as np
import torch


class _SignSTE(torch.autograd.Function):
    """Forward: exactly ±1, with x >= 0 -> +1 (torch.sign would give 0 at 0). Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones_like(x)
        return torch.where(x >= 0, one, -one)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """±1 codes whose gradient passes straight through (DESIGN §2, as in CIBHash's hash layer)."""
    return _SignSTE.apply(x)


def probs_and_codes(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, L) -> (p, s): bit probabilities p = σ(logits) and codes s = sign(p − ½) with STE."""
    p = torch.sigmoid(logits)
    return p, sign_ste(p - 0.5)


def _as_numpy(codes) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        return codes.detach().cpu().numpy()
    return np.asarray(codes)


def pack_codes(codes) -> np.ndarray:
    """±1 codes (N, L), torch or numpy -> uint8 (N, ceil(L/8)), +1 -> bit 1, np.packbits (big-endian) order."""
    bits = _as_numpy(codes) > 0
    if bits.ndim != 2:
        raise ValueError(f"pack_codes: expected (N, L) codes, got shape {bits.shape}")
    return np.packbits(bits, axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 (N, ceil(bits/8)) -> float32 ±1 (N, bits)."""
    b = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)
    return b.astype(np.float32) * 2.0 - 1.0


def code_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ±1 codes: (Na, L), (Nb, L) -> (Na, Nb) = a @ b.T / L."""
    return a @ b.T / a.shape[1]


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distance of ±1 codes: (Na, L), (Nb, L) -> (Na, Nb) int64, (L − a·b) / 2."""
    a = torch.as_tensor(a, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32, device=a.device)
    # a·b is an exact integer in float32 for L < 2**24; the round only guards the cast to int.
    return torch.round((a.shape[1] - a @ b.T) / 2).long()


def masked_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-masked cosine of ±1 codes (DESIGN §2 cos_k): out[i, j] = Σ_b m_ib a_ib b_jb / Σ_b m_ib.

    a (Na, L), b (Nb, L), mask (Na, L) {0,1}: one mask per row of a (the anchor's cluster mask). Every mask row
    must keep at least one bit (bit_masks guarantees it); an empty row raises, rather than silently giving 0.
    """
    kept = require_kept_bits(mask.sum(dim=1, keepdim=True), "masked_cosine")
    return (a * mask) @ b.T / kept


def require_kept_bits(kept: torch.Tensor, where: str) -> torch.Tensor:
    """`kept` (bits kept per mask row), after checking that no row keeps none. On a GPU the check is a device-side
    assert: reading the answer on the host would stall every training step until the GPU caught up."""
    msg = f"{where}: a mask row keeps no bit (bit masks must keep at least one bit)"
    if kept.device.type == "cpu":
        if bool((kept == 0).any()):
            raise ValueError(msg)
    else:
        torch._assert_async((kept > 0).all(), msg)
    return kept
