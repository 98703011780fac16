"""The training loss: a weighted sum over modality pairs, each with its own temperature.

    ContrastiveLoss([("image", "text"), ("audio", "text")], kind="infonce", tile_size=1024,
                    temperature=Temperature(init=0.07), temperatures={"audio-text": Temperature(0.05, False)})

`kind` picks the pair loss: `infonce` (CLIP, plain or tiled) or `siglip` (sigmoid, with a learnable
bias per pair). A pair's logit scale is exp(param), clamped at its maximum (100 as in CLIP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from contrastive.distributed import all_reduce_sum, world_size
from contrastive.loss.infonce import info_nce
from contrastive.loss.pairs import Pair, pair_name
from contrastive.loss.siglip import sigmoid_loss
from contrastive.modalities.base import ConfigError

KINDS = ("infonce", "siglip")


@dataclass(frozen=True)
class Temperature:
    init: float = 0.07
    learnable: bool = True
    max_logit_scale: float = 100.0


class ContrastiveLoss(nn.Module):
    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        kind: str = "infonce",
        temperature: Temperature = Temperature(),
        temperatures: Mapping[str, Temperature] | None = None,
        weights: Mapping[str, float] | None = None,
        tile_size: int = 0,
        bias_init: float = -10.0,
        label_aware: bool = False,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"loss.kind: expected one of {KINDS}, got {kind!r}")
        self.pairs = [tuple(p) for p in pairs]
        self.kind, self.tile_size, self.label_aware = kind, tile_size, label_aware
        names = [pair_name(p) for p in self.pairs]
        for key, given in (("weights", weights), ("temperatures", temperatures)):
            unknown = sorted(set(given or {}) - set(names))
            if unknown:
                raise ConfigError(f"loss.{key}: {unknown} are not configured pairs {names}")
        self.weights = {n: float((weights or {}).get(n, 1.0)) for n in names}
        self.temperatures = {n: (temperatures or {}).get(n, temperature) for n in names}
        # Shape [1], not scalars: DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor
        # cannot be viewed as (open_clip's `nonscalar_logit_scale` exists for the same reason).
        self.logit_scale = nn.ParameterDict({
            n: nn.Parameter(torch.tensor([math.log(1.0 / t.init)]), requires_grad=t.learnable)
            for n, t in self.temperatures.items()
        })
        if kind == "siglip":
            self.logit_bias = nn.ParameterDict({n: nn.Parameter(torch.tensor([float(bias_init)])) for n in names})

    def scales(self) -> dict[str, torch.Tensor]:
        """Each pair's logit scale, exp(param) clamped at its maximum, as a scalar."""
        return {n: p.exp().clamp(max=self.temperatures[n].max_logit_scale).squeeze(0)
                for n, p in self.logit_scale.items()}

    def pair_loss(self, name: str, a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                  label_ids: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "siglip":
            return sigmoid_loss(a, b, valid, scale, self.logit_bias[name].squeeze(0), label_ids=label_ids)
        return info_nce(a, b, valid, scale, label_ids=label_ids, tile_size=self.tile_size)

    def forward(
        self,
        embeddings: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        label_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to backpropagate on this rank, metrics). Engines average gradients over ranks, so
        each rank's share is scaled by the world size; the logged pair losses are global."""
        if self.label_aware and label_ids is None:
            raise ValueError("loss.label_aware needs label ids in the batch")
        labels = label_ids if self.label_aware else None
        scales = self.scales()
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for a, b in self.pairs:
            name = pair_name((a, b))
            local = self.pair_loss(name, embeddings[a], embeddings[b], masks[a] & masks[b], scales[name], labels)
            total = total + self.weights[name] * local * world_size()
            logs[f"loss/{name}"] = all_reduce_sum(local.detach())
            logs[f"logit_scale/{name}"] = scales[name].detach()
            if self.kind == "siglip":
                logs[f"logit_bias/{name}"] = self.logit_bias[name].detach()
        return total, logs
