"""BRCD loss: bit-mask robust contrastive knowledge distillation (He et al., WWW 2024), exactly as DESIGN §2.

Rows. There are 2B rows: row i < B has anchor s_i (student, view 1), row B + i has anchor s'_i (view 2) and is the
view-1 row with t_i and t'_i swapped. Row order in `reduction="none"` output: view-1 rows 0..B-1, then view-2 rows.

Row of anchor s_i, k = c(i) its image's pseudo-label (not the cluster of the view's own code):
- positive  α_i·cos(s_i, t_i)/τ + (1 − α_i)·cos_k(s_i, t'_i)/τ; α_i = α, or 1 when structural=False, or 1 when
  cluster_removal and the offset rule fires (cluster(t'_i) != c(i): t'_i then plays no role in the row at all);
- negatives cos_k(s_i, z)/τ for z in {s_j, s'_j, t_j, t'_j : j != i} (4B − 4 candidates), minus, when
  cluster_removal, every candidate with c(j) == c(i) (false negatives leave the denominator; they are not positives);
- loss_i = −log( e^pos / (e^pos + Σ_neg e^neg) ).
cos_k uses the mask of cluster k when bit_mask, else all bits; the individual term cos(s_i, t_i) always uses all bits.

Choices where DESIGN §2 leaves room (each pinned by a test):
- The positive is in the denominator (standard InfoNCE), so every row's loss is >= 0.
- A row left with no negative (every other image shares its cluster) has loss exactly 0 and no gradient, and still
  counts in the mean over 2B rows, so the loss scale does not depend on how many such rows a batch has.
- The student codes s_j, s'_j used as negatives carry gradient (as in NT-Xent); teacher codes are detached.
- masks rows must keep >= 1 bit (bit_masks falls back to all bits); an empty mask row raises instead of giving 0.

Variants (the defaults, listed first, are DESIGN §2 and the behaviour above, computed by the same ops):
- mask_normalization "kept" | "length": a masked similarity is divided by the kept bits, √(|m_a|·|m_z|) (= |m_k|
  with one-sided masks), or by L. Dividing by the kept bits scales every masked logit's gradient by L/|m|.
- mask_sides "anchor" | "both": every code in the row is masked with the anchor's cluster mask m_k, or (the authors'
  code) each code with its own image's cluster mask, m_{c(i)} on the anchor and t'_i, m_{c(j)} on a candidate of
  image j, so the numerator sums over m_a ∩ m_z.
- cosine "dot" | "normalised": a·b over the normaliser above (gradient t/n on every bit), or the normalised cosine
  (a⊙m_a)·(z⊙m_z) / (‖a⊙m_a‖‖z⊙m_z‖) of the authors' nn.CosineSimilarity, for the individual term too (equal in
  value on ±1 codes, whose masked norms are √|m|; its gradient is (z − cos·a)/n). It has its own normaliser, so it
  takes mask_normalization "kept" only.
- negatives "all" | "authors": all four codes of every other image, {s_j, s'_j, t_j, t'_j} (4B − 4), or the
  authors' {s_j, t'_j} (2B − 2): the anchor's view's student codes and the other view's teacher codes (the view-2
  row, anchor s'_i: {s'_j, t_j}).
- authors_release: the authors' shipped masks, all zeros: every masked similarity (structural term, negatives)
  is 0, so a row is log(1 + n_i·e^{−α_i·cos(s_i, t_i)/τ}) with n_i its negatives: an individual-only pull, which is
  what the paper's reported BRCD computed. Needs bit_mask (it is a mask); masks are then not read.
"""

from __future__ import annotations

import torch

from brcd_dist.codes import masked_cosine, require_kept_bits
from brcd_dist.losses.registry import KDInputs, register_kd

MASK_NORMALIZATIONS = ("kept", "length")
MASK_SIDES = ("anchor", "both")
COSINES = ("dot", "normalised")
NEGATIVES = ("all", "authors")
_EPS = 1e-8  # floor of a normalised cosine's denominator, as nn.CosineSimilarity


def check_variant(
    mask_normalization: str = "kept",
    mask_sides: str = "anchor",
    cosine: str = "dot",
    negatives: str = "all",
    authors_release: bool = False,
    bit_mask: bool = True,
) -> None:
    """Raise ValueError naming the first bad variant value (or combination) and what is allowed."""
    for key, value, allowed in (
        ("mask_normalization", mask_normalization, MASK_NORMALIZATIONS),
        ("mask_sides", mask_sides, MASK_SIDES),
        ("cosine", cosine, COSINES),
        ("negatives", negatives, NEGATIVES),
    ):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: allowed: {', '.join(allowed)}")
    if cosine == "normalised" and mask_normalization != "kept":
        raise ValueError(
            f"mask_normalization={mask_normalization!r}: cosine='normalised' has its own normaliser, allowed: kept"
        )
    if authors_release and not bit_mask:
        raise ValueError("authors_release=True: the all-zero mask of the authors' release needs bit_mask=True")


def brcd_loss(
    s1: torch.Tensor,
    s2: torch.Tensor,
    t1: torch.Tensor,
    t2: torch.Tensor,
    labels: torch.Tensor,
    view_clusters1: torch.Tensor,
    view_clusters2: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    alpha: float,
    tau: float,
    structural: bool = True,
    cluster_removal: bool = True,
    bit_mask: bool = True,
    reduction: str = "mean",
    mask_normalization: str = "kept",
    mask_sides: str = "anchor",
    cosine: str = "dot",
    negatives: str = "all",
    authors_release: bool = False,
) -> torch.Tensor:
    """s1, s2: student ±1 codes (B, L) of views 1, 2; t1, t2: teacher codes; labels: c(i) (B,) long;
    view_clusters1/2: nearest-centroid cluster of t1/t2 (B,); masks: (K, L) {0,1} (may be None if not bit_mask,
    or with authors_release). Returns the mean over the 2B rows, or the (2B,) row losses when reduction="none"."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"brcd_loss: reduction={reduction!r}, allowed: mean, none")
    try:
        check_variant(mask_normalization, mask_sides, cosine, negatives, authors_release, bit_mask)
    except ValueError as e:
        raise ValueError(f"brcd_loss: {e}") from None
    default_similarity = (mask_normalization, mask_sides, cosine) == ("kept", "anchor", "dot")
    b, n_bits = s1.shape
    device = s1.device
    t1, t2 = t1.detach().to(s1.dtype), t2.detach().to(s1.dtype)  # frozen teacher (DESIGN §2)
    labels = labels.to(device)

    anchors = torch.cat([s1, s2])  # (2B, L)
    own_view_teacher = torch.cat([t1, t2])  # individual-space target: same image, same view
    other_view_teacher = torch.cat([t2, t1])  # structural target: same image, other view
    other_view_cluster = torch.cat([view_clusters2, view_clusters1]).to(device)
    row_image = torch.arange(b, device=device).repeat(2)
    row_label = labels.repeat(2)

    if bit_mask and not authors_release:
        if masks is None:
            raise ValueError("brcd_loss: bit_mask=True needs masks (K, L)")
        masks = masks.to(device=device, dtype=anchors.dtype)
        row_mask = masks[row_label]
    else:
        masks = None
        row_mask = torch.ones_like(anchors)
    candidates = torch.cat([s1, s2, t1, t2])  # (4B, L)
    cand_image = torch.arange(b, device=device).repeat(4)
    cand_label = labels.repeat(4)

    # Positive logit (DESIGN §2): α·cos + (1 − α)·cos_k, with α_i = 1 where the structural term is off for the row.
    if cosine == "dot":
        positive = (anchors * own_view_teacher).sum(dim=1) / n_bits
    else:
        positive = _normalised_pairs(anchors, own_view_teacher, torch.ones_like(anchors))
    if structural:
        row_alpha = torch.full((2 * b,), float(alpha), dtype=anchors.dtype, device=device)
        if cluster_removal:  # offset positive: the other view drifted out of the anchor's cluster
            row_alpha = torch.where(other_view_cluster != row_label, torch.ones_like(row_alpha), row_alpha)
        if authors_release:  # all-zero masks: every masked similarity is 0
            structural_sim = torch.zeros_like(positive)
        elif default_similarity:
            structural_sim = (anchors * other_view_teacher * row_mask).sum(dim=1) / row_mask.sum(dim=1)
        else:  # t'_i is image i's code: its own mask is the anchor's under both mask_sides
            structural_sim = _pair_similarity(anchors, other_view_teacher, row_mask, n_bits, mask_normalization, cosine)
        positive = row_alpha * positive + (1 - row_alpha) * structural_sim
    positive = positive / tau

    # Negatives: the codes of the other images, each labelled by its image's c(j).
    keep = cand_image.unsqueeze(0) != row_image.unsqueeze(1)
    if negatives == "authors":  # {s_j, t'_j} for view-1 rows, {s'_j, t_j} for view-2 rows
        cand_block = torch.arange(4, device=device).repeat_interleave(b).unsqueeze(0)  # 0: s, 1: s', 2: t, 3: t'
        row_view = torch.arange(2, device=device).repeat_interleave(b).unsqueeze(1)
        keep &= (cand_block == row_view) | (cand_block == 3 - row_view)
    if cluster_removal:  # false negatives leave the denominator
        keep &= cand_label.unsqueeze(0) != row_label.unsqueeze(1)
    if authors_release:
        similarity = anchors.new_zeros((2 * b, 4 * b))
    elif default_similarity:
        similarity = masked_cosine(anchors, candidates, row_mask)
    else:
        cand_mask = masks[cand_label] if (masks is not None and mask_sides == "both") else None
        similarity = _matrix_similarity(anchors, candidates, row_mask, cand_mask, n_bits, mask_normalization, cosine)
    negative_logits = (similarity / tau).masked_fill(~keep, float("-inf"))

    logits = torch.cat([positive.unsqueeze(1), negative_logits], dim=1)
    rows = torch.logsumexp(logits, dim=1) - positive  # −log softmax of the positive
    return rows if reduction == "none" else rows.mean()


def _normalised_pairs(a: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise normalised cosine of a⊙m and z⊙m: (R, L) x3 -> (R,)."""
    norms = torch.sqrt((a * a * mask).sum(dim=1)) * torch.sqrt((z * z * mask).sum(dim=1))
    return (a * z * mask).sum(dim=1) / norms.clamp_min(_EPS)


def _require_bits(kept: torch.Tensor) -> torch.Tensor:
    return require_kept_bits(kept, "brcd_loss")


def _pair_similarity(
    a: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, n_bits: int, normalization: str, cosine: str
) -> torch.Tensor:
    """Similarity of a_r and z_r, both under mask_r: (R, L) x3 -> (R,)."""
    if cosine == "normalised":
        _require_bits(mask.sum(dim=1))
        return _normalised_pairs(a, z, mask)
    denominator = _require_bits(mask.sum(dim=1)) if normalization == "kept" else n_bits
    return (a * z * mask).sum(dim=1) / denominator


def _matrix_similarity(
    a: torch.Tensor,
    z: torch.Tensor,
    row_mask: torch.Tensor,
    cand_mask: torch.Tensor | None,
    n_bits: int,
    normalization: str,
    cosine: str,
) -> torch.Tensor:
    """(R, C) similarities of anchors a (R, L) to candidates z (C, L). cand_mask None: every code under its row's
    mask (one-sided); else a_r under row_mask_r and z_c under cand_mask_c (two-sided)."""
    kept_a = _require_bits(row_mask.sum(dim=1, keepdim=True))  # (R, 1)
    if cand_mask is None:
        numerator = (a * row_mask) @ z.T
        z_norm_sq = row_mask @ (z * z).T  # (R, C): ‖z_c ⊙ m_r‖²
        kept_z = kept_a
    else:
        numerator = (a * row_mask) @ (z * cand_mask).T
        z_norm_sq = (z * z * cand_mask).sum(dim=1).unsqueeze(0)  # (1, C): ‖z_c ⊙ m_c‖²
        kept_z = _require_bits(cand_mask.sum(dim=1)).unsqueeze(0)
    if cosine == "normalised":
        a_norm = torch.sqrt((a * a * row_mask).sum(dim=1, keepdim=True))
        return numerator / (a_norm * torch.sqrt(z_norm_sq)).clamp_min(_EPS)
    if normalization == "length":
        return numerator / n_bits
    return numerator / torch.sqrt(kept_a * kept_z)


def variant_kwargs(cfg) -> dict:
    """The brcd_loss keyword arguments a BRCDConfig selects (everything but the batch)."""
    return {
        "alpha": cfg.alpha,
        "tau": cfg.tau,
        "structural": cfg.structural,
        "cluster_removal": cfg.cluster_removal,
        "bit_mask": cfg.bit_mask,
        "mask_normalization": cfg.mask_normalization,
        "mask_sides": cfg.mask_sides,
        "cosine": cfg.cosine,
        "negatives": cfg.negatives,
        "authors_release": cfg.authors_release,
    }


def _needs(cfg) -> tuple[str, ...]:
    uses_masks = cfg.bit_mask and not cfg.authors_release
    return ("labels", "view_clusters1", "view_clusters2", *(("masks",) if uses_masks else ()))


@register_kd("brcd", needs=_needs)
def _brcd(x: KDInputs, cfg) -> torch.Tensor:
    return brcd_loss(
        x.s1, x.s2, x.t1, x.t2, x.labels, x.view_clusters1, x.view_clusters2, x.masks, **variant_kwargs(cfg)
    )
