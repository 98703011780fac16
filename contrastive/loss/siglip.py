"""SigLIP's sigmoid loss, exact across ranks.

Every (row, column) pair of the global batch is a binary problem: positive for a sample's own
partner, negative otherwise. Each rank scores its rows against the gathered columns of every rank
(the gather form of open_clip's SigLipLoss; the neighbour exchange computes the same sum), so the
loss and its gradients equal one process holding the whole batch. The loss is the sum over pairs
divided by the number of valid rows (SigLIP's normalisation). Masks as in InfoNCE: columns of
samples lacking a modality are no negatives, nor (with label ids) same-label columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive.distributed import gather_no_grad, gather_with_grad, rank
from contrastive.loss.infonce import dead_columns


def sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    label_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP loss of this rank's rows (a) against all ranks' columns (b); see `info_nce` for shapes."""
    all_b = gather_with_grad(b.float())
    all_valid = gather_no_grad(valid)
    all_labels = gather_no_grad(label_ids) if label_ids is not None else None
    n = a.shape[0]
    targets = torch.arange(n, device=a.device) + rank() * n
    logits = logit_scale.float() * a.float() @ all_b.T + logit_bias.float()
    sign = torch.full_like(logits, -1.0)
    sign[torch.arange(n, device=a.device), targets] = 1.0
    keep = ~dead_columns(all_valid, label_ids, all_labels, targets, 0) & valid[:, None]
    per_pair = -F.logsigmoid(sign * logits) * keep
    return per_pair.sum() / all_valid.sum().clamp(min=1)
