"""Symmetric InfoNCE over modality pairs, exact across ranks, with a temperature per pair.

Each rank scores its own rows against the columns of every rank (the "local loss" form of open_clip
with a differentiable all-gather), so the loss and its gradients equal those of one process holding
the global batch. A row that lacks either modality of a pair is neither a positive nor a negative
for that pair, on any rank.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, rank, world_size
from contrastive.modalities.base import ConfigError

Pair = tuple[str, str]


def resolve_pairs(spec: Any, modalities: Sequence[str]) -> list[Pair]:
    """`all` | `anchor:<name>` | a list of [a, b] -> the list of pairs, checked against `modalities`.

    `all` pairs every two modalities; `anchor:image` pairs every modality with image (ImageBind's
    binding modality)."""
    names = list(modalities)
    if spec == "all":
        pairs = list(itertools.combinations(names, 2))
    elif isinstance(spec, str) and spec.startswith("anchor:"):
        anchor = spec.split(":", 1)[1]
        if anchor not in names:
            raise ConfigError(f"loss.pairs: anchor {anchor!r} is not among modalities {names}")
        pairs = [(anchor, m) for m in names if m != anchor]
    elif isinstance(spec, str):
        raise ConfigError(f"loss.pairs: expected 'all', 'anchor:<modality>' or a list of pairs, got {spec!r}")
    else:
        pairs = [tuple(p) for p in spec]
        for p in pairs:
            if len(p) != 2 or p[0] == p[1] or any(m not in names for m in p):
                raise ConfigError(f"loss.pairs: {list(p)} is not a pair of two of the modalities {names}")
    if not pairs:
        raise ConfigError(f"loss.pairs: {spec!r} gives no pair for modalities {names}")
    return pairs


def pair_name(pair: Pair) -> str:
    return f"{pair[0]}-{pair[1]}"


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows, normalised by the global number of valid rows.

    a, b: [n, d] L2-normalised embeddings of the same n samples on this rank; valid: [n] bool, rows
    that hold both modalities; logit_scale: scalar (already exponentiated). Summed over ranks, the
    returned values equal the loss of one process holding the whole batch.
    """
    # Every rank builds the same graph whatever its masks hold, so the collectives in the backward of
    # the two gathers run in the same order everywhere (no data-dependent branches below).
    all_a = gather_with_grad(a.float())
    all_b = gather_with_grad(b.float())
    all_valid = gather_no_grad(valid)
    n_valid = all_valid.sum().clamp(min=1)
    targets = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
    # A finite "minus infinity": exp() of it is exactly 0 in fp32, and a row whose own target is
    # masked (an invalid row) gives a finite loss that its zero weight removes without NaNs.
    dead = (~all_valid)[None]
    logits_ab = (logit_scale * a.float() @ all_b.T).masked_fill(dead, -1e9)
    logits_ba = (logit_scale * b.float() @ all_a.T).masked_fill(dead, -1e9)
    ce = F.cross_entropy(logits_ab, targets, reduction="none") + F.cross_entropy(
        logits_ba, targets, reduction="none"
    )
    return (ce * valid).sum() / (2 * n_valid)


class ContrastiveLoss(nn.Module):
    """Sum over pairs of weight * InfoNCE, each pair with its own (learnable or fixed) temperature.

    The logit scale of a pair is exp(param), clamped at `max_logit_scale` (100 as in CLIP)."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        temperature: float = 0.07,
        learnable: bool = True,
        max_logit_scale: float = 100.0,
        weights: dict[str, float] | None = None,
    ):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.max_logit_scale = max_logit_scale
        weights = dict(weights or {})
        unknown = set(weights) - {pair_name(p) for p in self.pairs}
        if unknown:
            raise ConfigError(f"loss.weights: {sorted(unknown)} are not configured pairs")
        self.weights = {pair_name(p): float(weights.get(pair_name(p), 1.0)) for p in self.pairs}
        self.logit_scale = nn.ParameterDict(
            {
                pair_name(p): nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)
                for p in self.pairs
            }
        )

    def scales(self) -> dict[str, torch.Tensor]:
        return {k: v.exp().clamp(max=self.max_logit_scale) for k, v in self.logit_scale.items()}

    def forward(
        self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (to backpropagate on this rank) and per-pair global losses (for logging)."""
        scales = self.scales()
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for a, b in self.pairs:
            name = pair_name((a, b))
            valid = masks[a] & masks[b]
            local = info_nce(embeddings[a], embeddings[b], valid, scales[name])
            # Gradients are averaged over ranks by the engine, so each rank's share is scaled back up.
            total = total + self.weights[name] * local * world_size()
            logs[f"loss/{name}"] = all_reduce_sum(local.detach())
            logs[f"logit_scale/{name}"] = scales[name].detach()
        return total, logs
