"""The training loss: a weighted sum over modality pairs, one registered pair loss per pair.

    ContrastiveLoss(InfoNCESettings(pairs="anchor:image", tile_size=1024,
                                    temperatures={"audio-image": {"init": 0.05, "learnable": False}}),
                    ["image", "audio", "text"])

The settings say which loss (`loss=infonce`, `loss=siglip` or a registered one), which pairs, their
weights and temperatures; each pair's loss module owns its parameters (logit scale, bias).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from contrastive.distributed import all_reduce_sum, world_size
from contrastive.errors import ConfigError
from contrastive.loss.base import LOSSES, LossSettings, PairLoss, Temperature, loss_class
from contrastive.loss.pairs import pair_name, resolve_pairs

DEFAULT_LOSS = "infonce"


def loss_settings(settings: LossSettings | Mapping[str, Any]) -> LossSettings:
    """Typed settings from a mapping (a stored config, a notebook's dict); a key the named loss does not
    take is a ConfigError naming it."""
    if isinstance(settings, LossSettings):
        return settings
    fields = dict(settings)
    name = fields.get("name") or DEFAULT_LOSS
    if name not in LOSSES:
        raise ConfigError(f"loss.name: unknown loss {name!r}; registered: {sorted(LOSSES)}")
    cls = LOSSES[name].settings
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"loss.{unknown[0]}: the {name} loss does not take {unknown}; it takes {sorted(known)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls(name=name)), fields))
    except OmegaConfBaseException as e:
        raise ConfigError(f"loss.{e.full_key}: {e.msg}") from None


def pair_temperature(settings: LossSettings, pair: str) -> Temperature:
    """The loss's temperature, with the fields `temperatures.<pair>` overrides."""
    fields = dict(settings.temperatures.get(pair) or {})
    known = {f.name for f in dataclasses.fields(Temperature)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"loss.temperatures.{pair}: unknown key(s) {unknown}; a temperature takes {sorted(known)}")
    return dataclasses.replace(settings.temperature, **fields)


class ContrastiveLoss(nn.Module):
    def __init__(self, settings: LossSettings | Mapping[str, Any], modalities: Sequence[str]):
        super().__init__()
        settings = loss_settings(settings)
        cls = loss_class(settings)
        self.settings = settings
        self.pairs = resolve_pairs(settings.pairs, list(modalities))
        names = [pair_name(p) for p in self.pairs]
        for key in ("weights", "temperatures"):
            unknown = sorted(set(getattr(settings, key)) - set(names))
            if unknown:
                raise ConfigError(f"loss.{key}: {unknown} are not configured pairs {names}")
        self.weights = {n: float(settings.weights.get(n, 1.0)) for n in names}
        self.losses: Mapping[str, PairLoss] = nn.ModuleDict(
            {n: cls(settings, pair_temperature(settings, n)) for n in names}
        )

    def scales(self) -> dict[str, torch.Tensor]:
        """Each pair's logit scale (clamped at its maximum), as a scalar."""
        return {n: loss.scale() for n, loss in self.losses.items()}

    def forward(
        self,
        embeddings: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        label_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to backpropagate on this rank, metrics). Engines average gradients over ranks, so
        each rank's share is scaled by the world size; the logged pair losses are global."""
        if self.settings.label_aware and label_ids is None:
            raise ValueError("loss.label_aware needs label ids in the batch")
        labels = label_ids if self.settings.label_aware else None
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for a, b in self.pairs:
            name = pair_name((a, b))
            loss = self.losses[name]
            local = loss(embeddings[a], embeddings[b], masks[a] & masks[b], labels)
            total = total + self.weights[name] * local * world_size()
            logs[f"loss/{name}"] = all_reduce_sum(local.detach())
            logs.update({f"{key}/{name}": value for key, value in loss.logs().items()})
        return total, logs
