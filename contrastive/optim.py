"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Sequence

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
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # names (substrings) of parameters without weight decay, beside every bias and norm
    no_decay: List[str] = field(default_factory=lambda: list(NO_DECAY_NAMES))


def param_groups(
    module: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = NO_DECAY_NAMES
) -> list[dict[str, Any]]:
    """Two groups: decayed weight matrices; and biases, norms (every tensor of fewer than 2 dims)
    and the parameters named in `no_decay_names` (embeddings, temperatures) without decay."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(key in name for key in no_decay_names):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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
