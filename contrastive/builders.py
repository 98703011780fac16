"""`build_*` functions: explicit arguments in, ready objects out. The CLI calls them with values
from the composed config; tests and notebooks call them directly."""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from contrastive.data.pipeline import ShardDataset
from contrastive.data.checks import preflight
from contrastive.data.sources import load_sources
from contrastive.loss import ContrastiveLoss, Temperature, resolve_pairs
from contrastive.modalities.base import MODALITIES, ConfigError, Modality, build_modality
from contrastive.model import ContrastiveModel, ContrastiveObjective
from contrastive.optim import NO_DECAY_NAMES, param_groups

log = logging.getLogger("contrastive")


def import_modules(names: Sequence[str]) -> None:
    """Imports user modules (e.g. ones that register a modality) before anything is built."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import {name!r}: {e}") from e


def build_modalities(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Modality]:
    """The enabled modalities, each built from its registered class and `settings[name]`."""
    if len(names) < 2:
        raise ConfigError(f"modalities: {list(names)}: at least two modalities are needed for a contrastive loss")
    if len(set(names)) != len(names):
        raise ConfigError(f"modalities: {list(names)} lists a modality twice")
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ConfigError(f"modalities: {unknown} not registered; registered: {sorted(MODALITIES)}")
    return {n: build_modality(n, **dict(settings.get(n) or {})) for n in names}


def build_loss(
    modality_names: Sequence[str],
    *,
    pairs: Any = "all",
    kind: str = "infonce",
    temperature: Mapping[str, Any] | None = None,
    temperatures: Mapping[str, Mapping[str, Any]] | None = None,
    weights: Mapping[str, float] | None = None,
    tile_size: int = 0,
    bias_init: float = -10.0,
    label_aware: bool = False,
) -> ContrastiveLoss:
    """The loss over `pairs` of `modality_names`; temperatures are dicts of Temperature's fields."""
    return ContrastiveLoss(
        resolve_pairs(pairs, list(modality_names)),
        kind=kind,
        temperature=Temperature(**dict(temperature or {})),
        temperatures={k: _temperature(f"loss.temperatures.{k}", v) for k, v in (temperatures or {}).items()},
        weights=weights,
        tile_size=tile_size,
        bias_init=bias_init,
        label_aware=label_aware,
    )


def _temperature(where: str, fields: Mapping[str, Any]) -> Temperature:
    known = set(Temperature.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a temperature takes {sorted(known)}")
    return Temperature(**dict(fields))


def build_objective(modalities: Mapping[str, Modality], *, embed_dim: int,
                    loss: ContrastiveLoss | None = None) -> ContrastiveObjective:
    """The towers of `modalities` and the loss (InfoNCE over all pairs unless given)."""
    return ContrastiveObjective(ContrastiveModel(modalities, embed_dim), loss or build_loss(list(modalities)))


def build_optimizer(
    module: torch.nn.Module,
    *,
    optimizer: Callable[..., torch.optim.Optimizer],
    scheduler: Callable[..., Any] | None,
    total_steps: int,
    no_decay: Sequence[str] = NO_DECAY_NAMES,
) -> tuple[torch.optim.Optimizer, Any]:
    """`optimizer` and `scheduler` are partials (Hydra `_partial_: true`); they receive the parameter
    groups (no weight decay on biases, norms, and parameters named in `no_decay`: embeddings and
    temperatures by default) and the run's length."""
    weight_decay = getattr(optimizer, "keywords", {}).get("weight_decay", 0.0)
    opt = optimizer(param_groups(module, weight_decay, no_decay))
    sched = scheduler(opt, total_steps=total_steps) if scheduler is not None else None
    return opt, sched


def build_dataset(
    spec: Any,
    modalities: Mapping[str, Modality],
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = False,
    epoch_samples: int = 0,
    modality_dropout: Mapping[str, float] | None = None,
    check: bool = True,
) -> ShardDataset:
    """A rank's loader dataset over `spec` (a directory, or a list of directories or {path, weight});
    with `check`, the preflight runs first (see contrastive.data.checks)."""
    sources = load_sources(spec)
    if check:
        preflight(sources, modalities, world_size=world_size, num_workers=num_workers, batch_size=batch_size,
                  what="data.train" if train else "data.eval")
    return ShardDataset(
        sources, modalities, batch_size=batch_size, train=train, seed=seed, shuffle_buffer=shuffle_buffer,
        rank=rank, world_size=world_size, num_workers=num_workers, resampled=resampled,
        epoch_samples=epoch_samples, modality_dropout=modality_dropout,
    )
