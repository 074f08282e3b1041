"""Classic hashing baselines on raw features: ITQ, PCA-sign and LSH (no deep model).

ITQ (Gong & Lazebnik, CVPR 2011, §2.2–2.3): centre the data, project onto the top-L principal directions
(V = (X - mean) W), then alternate B = sgn(V R) and the orthogonal Procrustes step R = S Ŝᵀ from the SVD
Vᵀ B = S Ω Ŝᵀ, each of which can only lower the quantisation loss ||B - V R||_F² (eq. 2). PCA-sign is the same
with R = I, LSH draws W from a Gaussian (random hyperplanes through the data mean). All three are one linear map
followed by sign, so they share `ITQModel` and `itq_encode`. Codes are ±1 float32 with 0 -> +1, as `codes.sign_ste`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ITQModel:
    mean: np.ndarray  # (d,) float64: the training data's mean
    components: np.ndarray  # (d, L) float64: PCA directions (or Gaussian directions for LSH)
    rotation: np.ndarray  # (L, L) float64 orthogonal (identity for PCA-sign and LSH)
    losses: list[float] = field(default_factory=list)  # ||B - V R||_F² after each ITQ iteration

    @property
    def bits(self) -> int:
        return self.rotation.shape[1]


def _as_matrix(x) -> np.ndarray:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return a.reshape(len(a), -1).astype(np.float64)  # images (N, C, H, W) or (N, H, W) -> (N, d)


def _sign(v: np.ndarray) -> np.ndarray:
    return np.where(v >= 0, 1.0, -1.0)


def pca_directions(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), top-`bits` eigenvectors of the covariance (d, bits), largest variance first)."""
    if not 1 <= bits <= min(x.shape):
        raise ValueError(f"bits={bits}: need 1 <= bits <= min(n, d) = {min(x.shape)}")
    mean = x.mean(axis=0)
    xc = x - mean
    _, vecs = np.linalg.eigh(xc.T @ xc)  # ascending eigenvalues; d x d is small for pixels (784, 3072)
    return mean, vecs[:, ::-1][:, :bits].copy()


def random_rotation(bits: int, seed: int) -> np.ndarray:
    """A seeded random orthogonal matrix (QR of a Gaussian matrix, signs fixed so that it is Haar-distributed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))
    return q * np.sign(np.diag(r))


def quantisation_loss(v: np.ndarray, rotation: np.ndarray) -> float:
    """||sgn(V R) - V R||_F², the objective of ITQ (eq. 2) at the best B for this R."""
    vr = v @ rotation
    return float(((_sign(vr) - vr) ** 2).sum())


def fit_itq(x, bits: int, iters: int = 50, seed: int = 0) -> ITQModel:
    """ITQ on x (N, d) (or images, flattened): PCA to `bits` dims, then `iters` rounds of B-step / R-step."""
    x = _as_matrix(x)
    mean, components = pca_directions(x, bits)
    v = (x - mean) @ components
    rotation = random_rotation(bits, seed)
    losses = []
    for _ in range(iters):
        b = _sign(v @ rotation)  # fix R: the best B is the sign
        s, _, st = np.linalg.svd(v.T @ b)  # fix B: orthogonal Procrustes, max tr(Bᵀ V R)
        rotation = s @ st
        losses.append(float(((b - v @ rotation) ** 2).sum()))
    return ITQModel(mean, components, rotation, losses)


def fit_pca_sign(x, bits: int) -> ITQModel:
    """PCA-sign: sgn of the top-`bits` principal components (ITQ without the rotation)."""
    x = _as_matrix(x)
    mean, components = pca_directions(x, bits)
    return ITQModel(mean, components, np.eye(bits))


def fit_lsh(x, bits: int, seed: int = 0) -> ITQModel:
    """LSH: sgn of `bits` seeded Gaussian projections of the centred data (Charikar's random hyperplanes)."""
    x = _as_matrix(x)
    components = np.random.default_rng(seed).standard_normal((x.shape[1], bits))
    return ITQModel(x.mean(axis=0), components, np.eye(bits))


def itq_encode(model: ITQModel, x, batch_size: int = 8192) -> np.ndarray:
    """±1 float32 codes (N, L) of x: sgn((x - mean) W R), 0 -> +1."""
    projection = model.components @ model.rotation
    out = np.empty((len(x), model.bits), np.float32)
    for s in range(0, len(x), batch_size):
        out[s : s + batch_size] = _sign((_as_matrix(x[s : s + batch_size]) - model.mean) @ projection)
    return out
