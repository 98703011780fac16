"""An exponential moving average of the model's weights (`trainer.ema={decay: 0.9998, start_step: 0,
every: 1, export: false}`), kept in fp32 beside the training engine.

What it averages is the weights the optimizer steps, in fp32: under DeepSpeed's mixed precision and
ZeRO 1-3 the master weights, gathered whole through DeepSpeed's public `safe_get_full_fp32_param`
(every rank asks for every parameter in the same order: it is collective); in plain fp32 the
parameters themselves. timm's ModelEmaV3 is not used: it averages a module's own parameters, which
under DeepSpeed's bf16 are the rounded 16-bit copies and under ZeRO-3 are empty partitions.

Only trained parameters are averaged: a frozen one (a frozen tower, the blocks `unlocked_blocks`
leaves locked, LoRA's base weights) never moves, so its average is itself; DeepSpeed keeps no master
weights for it, and ZeRO-3 holds only a partition. The averaged model takes it from the live model,
gathered whole (collective under ZeRO-3).

Every rank keeps the same whole copy (4 bytes a trained parameter: for ZeRO-3 at scale, that is the
cost of this choice). Rank 0 writes it into each checkpoint (`ema.safetensors`), every rank reads it back
on resume, so a resumed run's average equals an uninterrupted one's. Evaluation scores it beside the
live weights (`eval/ema/...`) through a plain copy of the model; `export: true` exports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from contrastive.errors import ConfigError

EMA_FILE = "ema.safetensors"


@dataclass
class EmaSettings:
    decay: float = 0.9998  # per update: shadow = decay x shadow + (1 - decay) x weights
    start_step: int = 0  # the first step after which the average is taken (it starts as the weights)
    every: int = 1  # steps between updates
    export: bool = False  # the export holds the average instead of the live weights


def ema_settings(fields: Mapping[str, Any] | None) -> EmaSettings | None:
    """Typed settings from `trainer.ema` (empty or None: no average); an unknown key is named."""
    if not fields:
        return None
    known = {f.name for f in dataclasses.fields(EmaSettings)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"trainer.ema: unknown key(s) {unknown}; it takes {sorted(known)}")
    settings = EmaSettings(**fields)
    if not 0.0 < settings.decay < 1.0 or settings.every < 1:
        raise ConfigError(f"trainer.ema: decay must lie in (0, 1) and every be >= 1, got {settings}")
    return settings


def partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 holds `model`'s parameters as partitions."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fp32_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trained parameter of `model` as the optimizer holds it, whole, in fp32 (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            master = safe_get_full_fp32_param(p)
            out[name] = (master if master is not None else p).detach().float().cpu()
    return out


def frozen_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen parameter of `model`, whole (collective under ZeRO-3, which gathers its partitions)."""
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    if not frozen or not partitioned(model):
        return {name: p.detach().clone() for name, p in frozen}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in frozen]):
        return {name: p.detach().clone() for name, p in frozen}


class WeightEma:
    """The average of `model`'s weights (the ContrastiveModel an engine trains)."""

    def __init__(self, model: torch.nn.Module, settings: EmaSettings):
        self.model, self.settings = model, settings
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0

    def after_step(self, step: int) -> None:
        """Collective: called by every rank after optimizer step `step`."""
        s = self.settings
        if step < s.start_step or (step - s.start_step) % s.every:
            return
        weights = fp32_weights(self.model)
        if self.shadow is None:
            self.shadow = {name: w.clone() for name, w in weights.items()}  # never the live tensors
        else:
            for name, w in weights.items():
                self.shadow[name].lerp_(w, 1 - s.decay)
        self.updates += 1

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        if self.shadow is not None:
            save_file(self.shadow, str(path), metadata={"updates": str(self.updates)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        if path.exists():
            self.shadow = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                self.updates = int(f.metadata()["updates"])

    def averaged_model(self) -> torch.nn.Module:
        """A plain copy of the model holding the average (for evaluation), on the model's device. Under
        ZeRO-3 the live parameters are partitions: the copy is built empty and filled, its buffers
        (which ZeRO does not partition) and frozen parameters (gathered) taken from the live model."""
        import copy

        assert self.shadow is not None, "no average taken yet"
        device = next(self.model.buffers(), next(self.model.parameters())).device
        if partitioned(self.model):
            from contrastive.model import ContrastiveModel

            with torch.device("meta"):
                copied = ContrastiveModel(self.model.modalities, self.model.embed_dim)
            copied = copied.to_empty(device=device)
            with torch.no_grad():  # every buffer, those no state dict holds too (a text tower's causal mask)
                for name, buffer in self.model.named_buffers():
                    copied.get_buffer(name).copy_(buffer)
            live = frozen_weights(self.model)
        else:
            copied, live = copy.deepcopy(self.model).float(), {}
        state = {**copied.state_dict(), **live, **{k: v.to(device) for k, v in self.shadow.items()}}
        copied.load_state_dict(state)
        return copied.float().to(device).eval()
