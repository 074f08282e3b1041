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
"""
from __future__ import annotations

import torch

from brcd_dist.codes import masked_cosine


def brcd_loss(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
              labels: torch.Tensor, view_clusters1: torch.Tensor, view_clusters2: torch.Tensor,
              masks: torch.Tensor | None, *, alpha: float, tau: float, structural: bool = True,
              cluster_removal: bool = True, bit_mask: bool = True, reduction: str = "mean") -> torch.Tensor:
    """s1, s2: student ±1 codes (B, L) of views 1, 2; t1, t2: teacher codes; labels: c(i) (B,) long;
    view_clusters1/2: nearest-centroid cluster of t1/t2 (B,); masks: (K, L) {0,1} (may be None if not bit_mask).
    Returns the mean over the 2B rows, or the (2B,) row losses when reduction="none"."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"brcd_loss: reduction={reduction!r}, allowed: mean, none")
    b, n_bits = s1.shape
    device = s1.device
    t1, t2 = t1.detach().to(s1.dtype), t2.detach().to(s1.dtype)  # frozen teacher (DESIGN §2)
    labels = labels.to(device)

    anchors = torch.cat([s1, s2])                      # (2B, L)
    own_view_teacher = torch.cat([t1, t2])             # individual-space target: same image, same view
    other_view_teacher = torch.cat([t2, t1])           # structural target: same image, other view
    other_view_cluster = torch.cat([view_clusters2, view_clusters1]).to(device)
    row_image = torch.arange(b, device=device).repeat(2)
    row_label = labels.repeat(2)

    if bit_mask:
        if masks is None:
            raise ValueError("brcd_loss: bit_mask=True needs masks (K, L)")
        row_mask = masks.to(device=device, dtype=anchors.dtype)[row_label]
    else:
        row_mask = torch.ones_like(anchors)

    # Positive logit (DESIGN §2): α·cos + (1 − α)·cos_k, with α_i = 1 where the structural term is off for the row.
    positive = (anchors * own_view_teacher).sum(dim=1) / n_bits
    if structural:
        row_alpha = torch.full((2 * b,), float(alpha), dtype=anchors.dtype, device=device)
        if cluster_removal:  # offset positive: the other view drifted out of the anchor's cluster
            row_alpha = torch.where(other_view_cluster != row_label, torch.ones_like(row_alpha), row_alpha)
        structural_sim = (anchors * other_view_teacher * row_mask).sum(dim=1) / row_mask.sum(dim=1)
        positive = row_alpha * positive + (1 - row_alpha) * structural_sim
    positive = positive / tau

    # Negatives: all codes of the other images, both views, student and teacher, each labelled by its image's c(j).
    candidates = torch.cat([s1, s2, t1, t2])           # (4B, L)
    cand_image = torch.arange(b, device=device).repeat(4)
    cand_label = labels.repeat(4)
    keep = cand_image.unsqueeze(0) != row_image.unsqueeze(1)
    if cluster_removal:  # false negatives leave the denominator
        keep &= cand_label.unsqueeze(0) != row_label.unsqueeze(1)
    negatives = (masked_cosine(anchors, candidates, row_mask) / tau).masked_fill(~keep, float("-inf"))

    logits = torch.cat([positive.unsqueeze(1), negatives], dim=1)
    rows = torch.logsumexp(logits, dim=1) - positive   # −log softmax of the positive
    return rows if reduction == "none" else rows.mean()
