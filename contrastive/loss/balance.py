"""Pair weights that adapt during training, so that lagging pairs get more of the shared towers' update
(`loss.balance`; off by default, when the fixed `loss.weights` act alone).

Both rules look at each pair's relative progress, its loss now over its loss at the start, r_p, and
at the pairs' mean of it: a pair whose loss fell less than the others' has rel_p = r_p / mean(r) > 1.

- `progress`: the weights move toward rel_p ^ alpha (an exponential average at `rate` a step).
- `gradnorm` (GradNorm, Chen et al. 2018): each pair's gradient norm at the towers' outputs, times
  its weight, G_p, is steered toward mean(G) x rel_p ^ alpha: w_p <- w_p x (target_p / G_p) ^ rate.

Either way the weights are then brought within [1 / max, max] summing to the number of pairs (scaled,
then clipped, the scale found by bisection so that both hold).
They live in the loss module (a buffer: saved with checkpoints, restored on resume) and are the same
on every rank, since they are computed from all-reduced losses and gradient norms.
"""

from __future__ import annotations

import torch
from torch import nn

BALANCE = ("none", "progress", "gradnorm")


class PairBalance(nn.Module):
    def __init__(self, pairs: list[str], rule: str, *, alpha: float = 1.0, rate: float = 0.05, max_weight: float = 4.0):
        super().__init__()
        if rule not in BALANCE:
            from contrastive.errors import ConfigError

            raise ConfigError(f"loss.balance: expected one of {BALANCE}, got {rule!r}")
        self.pairs, self.rule = list(pairs), rule
        self.alpha, self.rate, self.max_weight = alpha, rate, max_weight
        self.register_buffer("weights", torch.ones(len(pairs), dtype=torch.float64))
        self.register_buffer("initial", torch.full((len(pairs),), float("nan"), dtype=torch.float64))

    @property
    def active(self) -> bool:
        return self.rule != "none"

    def weight(self, pair: str) -> float:
        return float(self.weights[self.pairs.index(pair)])

    def update(self, losses: torch.Tensor, grad_norms: torch.Tensor | None = None) -> None:
        """After a step: `losses` [P] the pairs' (global) losses; `grad_norms` [P] their gradient norms
        at the towers' outputs before weighting (gradnorm)."""
        losses = losses.detach().double().to(self.weights.device)
        if not torch.isfinite(losses).all():
            return  # a skipped step teaches nothing about progress
        if torch.isnan(self.initial).any():
            self.initial.copy_(losses)
        ratio = losses / self.initial.clamp(min=1e-12)
        relative = ratio / ratio.mean()
        if self.rule == "progress":
            target = relative.pow(self.alpha)
            target = target * len(target) / target.sum()
            weights = (1 - self.rate) * self.weights + self.rate * target
        else:
            assert grad_norms is not None, "gradnorm needs the pairs' gradient norms"
            weighted = self.weights * grad_norms.detach().double().to(self.weights.device).clamp(min=1e-12)
            target = weighted.mean() * relative.pow(self.alpha)
            weights = self.weights * (target / weighted).pow(self.rate)
        self.weights.copy_(self.bounded(weights))

    def bounded(self, weights: torch.Tensor) -> torch.Tensor:
        """clamp(c x weights, 1/max, max) with c such that they sum to the number of pairs."""
        lo, hi, target = 1 / self.max_weight, self.max_weight, float(len(weights))
        small, large = 0.0, 1.0
        while float((large * weights).clamp(lo, hi).sum()) < target:
            large *= 2
        for _ in range(60):
            middle = (small + large) / 2
            if float((middle * weights).clamp(lo, hi).sum()) < target:
                small = middle
            else:
                large = middle
        return (large * weights).clamp(lo, hi)
