"""SigLIP's sigmoid loss, exact across ranks.

Every (row, column) pair of the global batch is a binary problem: positive for a sample's own
partner, negative otherwise. Each rank scores its rows against the gathered columns of every rank
(the gather form of open_clip's SigLipLoss; the neighbour exchange computes the same sum), so the
loss and its gradients equal one process holding the whole batch. The loss is the sum over pairs
divided by the number of valid rows (SigLIP's normalisation). Masks as in InfoNCE: columns of
samples lacking a modality are no negatives, nor (with label ids) same-label columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.distributed import gather_no_grad, gather_with_grad, rank
from contrastive.loss.base import LossSettings, PairLoss, Temperature, register_loss
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


@dataclass
class SigLIPSettings(LossSettings):
    # SigLIP's start: logit scale 10 and bias -10, both learnable per pair
    temperature: Temperature = field(default_factory=lambda: Temperature(init=0.1))
    bias_init: float = -10.0


@register_loss("siglip")
class SigLIP(PairLoss):
    """SigLIP's sigmoid loss (`loss=siglip`), with a learnable logit bias per pair."""

    settings = SigLIPSettings

    def __init__(self, settings: SigLIPSettings, temperature: Temperature):
        super().__init__(settings, temperature)
        self.logit_bias = nn.Parameter(torch.tensor([float(settings.bias_init)]))

    def forward(self, a, b, valid, label_ids=None):
        return sigmoid_loss(a, b, valid, self.scale(), self.logit_bias.squeeze(0), label_ids=label_ids)

    def logs(self):
        return {**super().logs(), "logit_bias": self.logit_bias.detach()}
