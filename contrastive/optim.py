"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Sequence

import torch
from omegaconf import MISSING
from torch import nn

# Parameters whose names hold one of these are embeddings or temperatures: no weight decay. (open_clip's
# trainer decays its positional and token embeddings; `optim.no_decay=[logit_scale]` does the same.)
NO_DECAY_NAMES = ("embedding", "pos_embed", "cls_token", "class_embedding", "logit_scale", "logit_bias")


@dataclass
class OptimConfig:
    """`optim.*`: the optimizer and schedule (instantiated: `_target_`, `_partial_`), clipping, decay rules."""

    optimizer: Any = MISSING  # _target_ + _partial_: called with the parameter groups
    scheduler: Any = None  # _target_ + _partial_: called with (optimizer, total_steps=...)
    # max global grad norm; 0 (open_clip's and DeepSpeed's default) clips nothing. At 1.0 it clipped
    # nearly every step of the emoji runs (norms ~5) and cost seen R@1 (benchmarks/README.md, per step)
    grad_clip: float = 0.0
    # names (substrings) of parameters without weight decay, beside every bias and norm
    no_decay: List[str] = field(default_factory=lambda: list(NO_DECAY_NAMES))


def param_groups(
    module: nn.Module,
    weight_decay: float,
    no_decay_names: Sequence[str] = NO_DECAY_NAMES,
    scales: Mapping[int, tuple[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Decayed weight matrices apart from biases, norms (every tensor of fewer than 2 dims) and the
    parameters named in `no_decay_names` (embeddings, temperatures), which are not decayed. With
    `scales` (id(parameter) -> (tower, learning-rate scale), see towers.layer_scales), one group per
    tower, scale and decay rule, each carrying its `lr_scale` and the tower's `name`."""
    scales = scales or {}
    groups: dict[tuple[str, float, bool], dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim < 2 or any(key in name for key in no_decay_names))
        tower, scale = scales.get(id(param), ("", 1.0))
        group = groups.setdefault(
            (tower, scale, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "name": tower or "base",
            },
        )
        group["params"].append(param)
    if not scales:  # the two groups as ever: decayed first
        return [
            groups.get(
                ("", 1.0, d),
                {"params": [], "weight_decay": weight_decay if d else 0.0, "lr_scale": 1.0, "name": "base"},
            )
            for d in (True, False)
        ]
    return list(groups.values())


def scale_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Each group's lr times its lr_scale (before a schedule records the groups' initial lrs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio` x the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
