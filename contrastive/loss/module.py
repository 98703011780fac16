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

from contrastive.distributed import all_reduce_sum, gather_no_grad, world_size
from contrastive.errors import ConfigError
from contrastive.loss.balance import PairBalance
from contrastive.loss.base import LOSSES, LossSettings, PairLoss, Temperature, loss_class
from contrastive.loss.pairs import pair_name, resolve_pairs

DEFAULT_LOSS = "infonce"
GEOMETRY_ROWS = 2048  # rows of the global batch the telemetry reads (its O(n^2) parts stay cheap)


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
        # only when asked: older checkpoints and exports hold no balance state
        self.balance = None
        if settings.balance != "none":
            self.balance = PairBalance(
                names,
                settings.balance,
                alpha=settings.balance_alpha,
                rate=settings.balance_rate,
                max_weight=settings.balance_max,
            )
        self.measure = False  # set for the steps that log: geometry and gradient shares too

    def scales(self) -> dict[str, torch.Tensor]:
        """Each pair's logit scale (clamped at its maximum), as a scalar."""
        return {n: loss.scale() for n, loss in self.losses.items()}

    def forward(
        self,
        embeddings: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        label_ids: torch.Tensor | None = None,
        norms: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to backpropagate on this rank, metrics). Engines average gradients over ranks, so
        each rank's share is scaled by the world size; the logged pair losses are global. With
        `measure` set, the metrics also hold the batch's geometry (contrastive.geometry: `norms`, the
        towers' output lengths before normalisation) and each pair's share of each tower's gradient."""
        if self.settings.label_aware and label_ids is None:
            raise ValueError("loss.label_aware needs label ids in the batch")
        labels = label_ids if self.settings.label_aware else None
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        locals_: dict[str, torch.Tensor] = {}
        for a, b in self.pairs:
            name = pair_name((a, b))
            loss = self.losses[name]
            local = locals_[name] = loss(embeddings[a], embeddings[b], masks[a] & masks[b], labels)
            weight = self.weights[name] * (self.balance.weight(name) if self.balance is not None else 1.0)
            total = total + weight * local * world_size()
            logs[f"loss/{name}"] = all_reduce_sum(local.detach())
            logs.update({f"{key}/{name}": value for key, value in loss.logs().items()})
        training = torch.is_grad_enabled() and self.training
        gradnorm = training and self.balance is not None and self.balance.rule == "gradnorm"
        grads = self.pair_gradients(embeddings, locals_) if training and (self.measure or gradnorm) else None
        if self.measure:
            logs.update(self.telemetry(embeddings, masks, norms, grads))
        if training and self.balance is not None:
            names = [pair_name(p) for p in self.pairs]
            norms_per_pair = torch.stack([grads[n].sum() for n in names]).sqrt() if grads is not None else None
            self.balance.update(torch.stack([logs[f"loss/{n}"] for n in names]), norms_per_pair)
            logs.update({f"balance/{n}": torch.tensor(self.balance.weight(n)) for n in names})
        return total, logs

    def pair_gradients(
        self, embeddings: Mapping[str, torch.Tensor], locals_: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """pair -> [its two modalities' squared gradient norms at the towers' outputs], over all ranks,
        of the pair's loss as weighted in the sum (what drives each tower's update)."""
        out = {}
        for a, b in self.pairs:
            name = pair_name((a, b))
            weight = self.weights[name] * (self.balance.weight(name) if self.balance is not None else 1.0)
            scaled = locals_[name] * weight * world_size()
            if not scaled.requires_grad:  # no sample of this rank holds the pair
                out[name] = all_reduce_sum(torch.zeros(2, device=scaled.device))
                continue
            # a frozen tower's (or a cached pass's) embeddings carry no gradient: its share is zero
            live = [m for m in (a, b) if embeddings[m].requires_grad]
            grads = torch.autograd.grad(scaled, [embeddings[m] for m in live], retain_graph=True, allow_unused=True)
            found = {m: g for m, g in zip(live, grads) if g is not None}
            zero = torch.zeros((), device=scaled.device)
            squares = [found[m].detach().float().square().sum() if m in found else zero for m in (a, b)]
            out[name] = all_reduce_sum(torch.stack(squares))
        return out

    def telemetry(self, embeddings, masks, norms, grads) -> dict[str, torch.Tensor]:
        """The global batch's geometry and, from `grads`, each pair's share of each tower's gradient."""
        from contrastive.geometry import geometry

        gathered = {n: gather_no_grad(x.detach().float())[:GEOMETRY_ROWS] for n, x in embeddings.items()}
        kept = {n: gather_no_grad(m)[:GEOMETRY_ROWS] for n, m in masks.items() if n in embeddings}
        lengths = {
            n: gather_no_grad(v.detach().float())[:GEOMETRY_ROWS] for n, v in (norms or {}).items() if n in embeddings
        }
        logs = {k: torch.tensor(v) for k, v in geometry(gathered, kept, self.pairs, lengths).items()}
        if grads:
            for m in embeddings:
                share = {pair_name(p): grads[pair_name(p)][p.index(m)].sqrt() for p in self.pairs if m in p}
                whole = sum(share.values())
                logs.update({f"grad_share/{m}/{n}": v / whole.clamp(min=1e-12) for n, v in share.items()})
        return logs
