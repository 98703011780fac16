"""The multi-modal model: one tower per modality, each ending in a projection to the shared space.

The model never names a modality: it holds a `ModuleDict` of encoders keyed by modality name and
embeds whatever the input dict holds. `ContrastiveObjective` adds the loss (and its temperatures) so
that one module, the one the training engine wraps, maps a batch to a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.loss import ContrastiveLoss
from contrastive.modalities.base import Modality, build_modality


@dataclass
class ModelConfig:
    """`model.*`: the shared embedding size and each tower's settings (`model.towers.<modality>`)."""

    embed_dim: int = 512
    # <modality>: the fields of TowerSettings (contrastive.towers), checked when the towers are set up;
    # a dict here so that `+model.towers.image={freeze: true}` works from the command line
    towers: Dict[str, Any] = field(default_factory=dict)


class ContrastiveModel(nn.Module):
    def __init__(self, modalities: Mapping[str, Modality], embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.modalities = dict(modalities)
        self.encoders = nn.ModuleDict({name: m.build_encoder(embed_dim) for name, m in self.modalities.items()})
        self.norms: dict[str, torch.Tensor] = {}  # the last batch's output lengths before normalisation
        from contrastive.pretrained import release

        release()  # the open_clip model the image and the text tower were taken from

    @classmethod
    def from_config(cls, modality_configs: Mapping[str, Mapping[str, Any]], embed_dim: int) -> "ContrastiveModel":
        return cls({name: build_modality(name, **dict(kw)) for name, kw in modality_configs.items()}, embed_dim)

    def config(self) -> dict[str, Any]:
        """What rebuilds this model (without weights): stored in checkpoints and exports."""
        return {
            "embed_dim": self.embed_dim,
            "modalities": {name: m.config() for name, m in self.modalities.items()},
        }

    def encode(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        """[batch, ...] inputs of one modality -> [batch, embed_dim] unit-norm fp32 embeddings.
        Floating inputs take the tower's dtype (bf16/fp16 towers under DeepSpeed's mixed precision);
        the normalisation runs in fp32, as autocast runs it, so the loss sees unrounded directions."""
        encoder = self.encoders[name]
        inputs = self.modalities[name].on_device(inputs)
        if inputs.is_floating_point():
            inputs = inputs.to(next(encoder.parameters()).dtype)
        raw = encoder(inputs).float()
        self.norms[name] = raw.detach().norm(dim=-1)  # the telemetry's `geometry/norm/<modality>`
        return F.normalize(raw, dim=-1)

    def set_grad_checkpointing(self, names: list[str]) -> None:
        """Activation checkpointing inside the named towers (open_clip and timm towers support it)."""
        for name in names:
            encoder = self.encoders[name]
            if not hasattr(encoder, "set_grad_checkpointing"):
                raise ValueError(f"the {name} tower has no set_grad_checkpointing()")
            encoder.set_grad_checkpointing(True)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {name: self.encode(name, batch[name]) for name in self.encoders if name in batch}

    @torch.no_grad()
    def embed(self, name: str, items: list[Any], batch_size: int = 64) -> torch.Tensor:
        """Raw user inputs (paths, PIL images, waveforms, strings) -> unit-norm embeddings (a value seen
        in several views, a long clip's windows, as their renormalised average)."""
        modality = self.modalities[name]
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(items), batch_size):
            views = [modality.views(modality.load(x)) for x in items[start : start + batch_size]]
            inputs = torch.stack([modality.preprocess(v, train=False) for item in views for v in item])
            owner = torch.tensor([i for i, item in enumerate(views) for _ in item], device=device)
            emb = self.encode(name, inputs.to(device)).float()
            total = torch.zeros(len(views), emb.shape[1], device=device).index_add_(0, owner, emb)
            out.append(F.normalize(total, dim=-1).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)


class ContrastiveObjective(nn.Module):
    """Model + loss: batch dict -> (loss to backpropagate, metrics). The module a trainer wraps."""

    def __init__(self, model: ContrastiveModel, loss: ContrastiveLoss):
        super().__init__()
        self.model = model
        self.loss = loss
        self.distill = None  # a contrastive.distill.Distillation: a frozen teacher's term beside the loss

    def forward(self, batch: Mapping[str, Any], embed_only: bool = False):
        """(loss, metrics); with `embed_only`, the embeddings (for cached-feature accumulation, which
        must still run the towers through the wrapping engine)."""
        embeddings = self.model(batch)
        if embed_only:
            return embeddings
        norms = self.model.norms if getattr(self.loss, "measure", False) else None
        extra = {} if norms is None else {"norms": norms}
        total, logs = self.loss(embeddings, batch["mask"], batch.get("label_id"), **extra)
        if self.distill is not None:
            term, more = self.distill(embeddings, batch, self.loss.scales())
            total, logs = total + term, {**logs, **more}
        return total, logs
