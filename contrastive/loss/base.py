"""The pair-loss contract and its registry, as modalities have theirs.

A pair loss is one class in one file: it subclasses `PairLoss`, registers itself by name, names its
settings dataclass (a subclass of `LossSettings`: the fields every loss takes plus its own, with
their defaults) and owns its parameters. `ContrastiveLoss` builds one instance per modality pair.

    @dataclass
    class MarginSettings(LossSettings):
        margin: float = 0.2

    @register_loss("margin")
    class Margin(PairLoss):
        settings = MarginSettings

        def forward(self, a, b, valid, label_ids=None):
            ...   # this rank's share of the pair's loss (see PairLoss.forward)

`contrastive-train imports=[my.module] loss=margin loss.margin=0.3` then trains with it: the
settings class is the config group option `loss=margin`, so a key it does not hold is refused with
its name, as is any key of another loss's settings.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

import torch
from torch import nn

from contrastive.errors import ConfigError

LOSSES: dict[str, type["PairLoss"]] = {}


@dataclass
class Temperature:
    """A pair's temperature: logit scale = 1 / init at the start, exp(param) clamped at the maximum."""

    init: float = 0.07
    learnable: bool = True
    max_logit_scale: float = 100.0  # CLIP's clamp


@dataclass
class LossSettings:
    """What every loss takes. A loss's own settings subclass this and add fields."""

    name: str = ""  # the registered loss; filled in by the config group (`loss=siglip`)
    pairs: Any = "all"  # all | anchor:<modality> | [[a, b], ...]
    weights: Dict[str, float] = field(default_factory=dict)  # "<a>-<b>": weight in the sum (default 1)
    temperature: Temperature = field(default_factory=Temperature)  # every pair's, unless overridden
    # "<a>-<b>": fields of Temperature that differ for that pair, e.g. {init: 0.05, learnable: false}
    temperatures: Dict[str, Any] = field(default_factory=dict)
    label_aware: bool = False  # samples with the same json label are no negatives of each other
    # adaptive pair weights on top of `weights` (contrastive.loss.balance): none | progress | gradnorm
    balance: str = "none"
    balance_alpha: float = 1.0  # how strongly a lagging pair is favoured (rel_progress ^ alpha)
    balance_rate: float = 0.05  # how fast the weights move, per step
    balance_max: float = 4.0  # the weights stay within [1 / max, max]


class PairLoss(nn.Module, ABC):
    """The loss of one modality pair, with its own learnable logit scale (temperature)."""

    name: ClassVar[str]
    settings: ClassVar[type[LossSettings]] = LossSettings

    def __init__(self, settings: LossSettings, temperature: Temperature):
        super().__init__()
        self.max_logit_scale = temperature.max_logit_scale
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor
        # cannot be viewed as (open_clip's `nonscalar_logit_scale` exists for the same reason).
        self.logit_scale = nn.Parameter(
            torch.tensor([math.log(1.0 / temperature.init)]), requires_grad=temperature.learnable
        )

    def scale(self) -> torch.Tensor:
        """The logit scale, exp(param) clamped at its maximum, as a scalar."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale).squeeze(0)

    @abstractmethod
    def forward(
        self, a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, label_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This rank's share of the pair's loss: summed over ranks, the loss of the global batch.

        a, b: [n, d] unit-norm embeddings of this rank's n samples (n is the same on every rank);
        valid: [n] bool, the rows holding both modalities; label_ids: [n] int64 (-1: no label),
        given when `label_aware` is set, to keep same-label samples from being negatives."""

    def logs(self) -> dict[str, torch.Tensor]:
        """Scalars logged per pair, e.g. {"logit_scale": ...} -> `logit_scale/<pair>`."""
        return {"logit_scale": self.scale().detach()}


def register_loss(name: str):
    """Class decorator: registers a `PairLoss` subclass under `name`."""

    def register(cls: type[PairLoss]) -> type[PairLoss]:
        if not (isinstance(cls, type) and issubclass(cls, PairLoss)):
            raise TypeError(f"@register_loss({name!r}) needs a PairLoss subclass, got {cls!r}")
        if not (isinstance(cls.settings, type) and issubclass(cls.settings, LossSettings)):
            raise TypeError(f"{cls.__name__}.settings must be a LossSettings dataclass")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return register


def loss_class(settings: LossSettings) -> type[PairLoss]:
    """The registered loss that `settings` are for (by their name, or else by their type)."""
    if settings.name:
        if settings.name not in LOSSES:
            raise ConfigError(
                f"loss.name: unknown loss {settings.name!r}; registered: {sorted(LOSSES)}. A loss "
                "defined in your own module is registered by importing it: imports=[your.module]"
            )
        cls = LOSSES[settings.name]
        if not isinstance(settings, cls.settings):
            raise ConfigError(
                f"loss.name={settings.name}, but the settings are {type(settings).__name__}: choose "
                f"a loss with loss={settings.name}, which brings its own settings"
            )
        return cls
    matches = [cls for cls in LOSSES.values() if type(settings) is cls.settings]
    if len(matches) != 1:
        raise ConfigError(f"loss: cannot tell which loss {type(settings).__name__} is for; set its name")
    return matches[0]
