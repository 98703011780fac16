"""The shared space's geometry, from a batch of embeddings: what says whether it is healthy beyond
the loss.

Per modality (unit-norm embeddings x of the samples holding it):
- uniformity: log E exp(-2 ||x_i - x_j||^2) over pairs i != j (Wang & Isola, t = 2); lower is more
  uniform over the sphere, a collapsed space is near 0;
- effective rank: exp of the entropy of the singular values' distribution (RankMe): how many
  directions the embeddings really use, from 1 (collapse) to the embedding size (the singular values
  from the eigenvalues of the d x d Gram matrix, not an SVD of the batch);
- norm: the towers' outputs' mean length before normalisation.
Per pair (a, b) over the samples holding both:
- alignment: E ||a_i - b_i||^2 over positives (lower: partners closer);
- gap: the distance between the two modalities' centroids ("Mind the Gap", Liang et al.);
- margin: the mean over rows of the positive's similarity minus the hardest negative's (a -> b).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F


def uniformity(x: torch.Tensor) -> float:
    """log E exp(-2 ||x_i - x_j||^2) over the pairs i != j of unit rows x; nan for fewer than 2 rows."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    squared = torch.cdist(x.double(), x.double()).square()
    off = squared[~torch.eye(n, dtype=torch.bool, device=x.device)]
    return float(torch.logsumexp(-2 * off, dim=0) - math.log(off.numel()))


def effective_rank(x: torch.Tensor) -> float:
    """exp(-sum p log p), p the singular values of x over their sum; nan for no rows or for a
    non-finite batch (which the trainer counts and skips; telemetry must not be what stops it)."""
    if x.shape[0] == 0 or not bool(torch.isfinite(x).all()):
        return float("nan")
    # the singular values as the square roots of the eigenvalues of the smaller Gram matrix (d x d
    # for a batch of n >= d rows): one symmetric eigensolve instead of an SVD of the whole batch
    x = x.double()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    s = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """E ||a_i - b_i||^2 over the rows (partners)."""
    return float((a.double() - b.double()).square().sum(dim=1).mean()) if len(a) else float("nan")


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mean(a) - mean(b)||: how far apart the two modalities sit."""
    return float((a.double().mean(0) - b.double().mean(0)).norm()) if len(a) and len(b) else float("nan")


def margin(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of cos(a_i, b_i) - max_{j != i} cos(a_i, b_j); nan for fewer than 2 rows."""
    n = a.shape[0]
    if n < 2:
        return float("nan")
    sims = a.double() @ b.double().T
    positive = sims.diagonal()
    hardest = sims.masked_fill(torch.eye(n, dtype=torch.bool, device=a.device), -math.inf).max(dim=1).values
    return float((positive - hardest).mean())


def geometry(
    embeddings: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    pairs: list[tuple[str, str]],
    norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """`geometry/...` metrics of one batch: per modality over its samples, per pair over the samples
    holding both (names `geometry/<what>/<modality>` and `geometry/<what>/<a>-<b>`)."""
    out: dict[str, float] = {}
    for name, x in embeddings.items():
        rows = F.normalize(x[masks[name]].float(), dim=-1)
        out[f"geometry/uniformity/{name}"] = uniformity(rows)
        out[f"geometry/effective_rank/{name}"] = effective_rank(rows)
        if norms is not None and name in norms:
            kept = norms[name][masks[name]]
            out[f"geometry/norm/{name}"] = float(kept.float().mean()) if len(kept) else float("nan")
    for a, b in pairs:
        both = masks[a] & masks[b]
        xa, xb = F.normalize(embeddings[a][both].float(), dim=-1), F.normalize(embeddings[b][both].float(), dim=-1)
        name = f"{a}-{b}"
        out[f"geometry/alignment/{name}"] = alignment(xa, xb)
        out[f"geometry/gap/{name}"] = gap(
            F.normalize(embeddings[a][masks[a]].float(), dim=-1), F.normalize(embeddings[b][masks[b]].float(), dim=-1)
        )
        out[f"geometry/margin/{name}"] = margin(xa, xb)
    return out
