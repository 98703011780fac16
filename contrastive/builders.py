"""`build_*` functions: explicit arguments in, ready objects out. The CLI calls them with values
from the composed config; tests and notebooks call them directly."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import torch

from contrastive.data.checks import preflight
from contrastive.data.pipeline import ShardDataset
from contrastive.data.settings import DataConfig
from contrastive.data.sources import load_sources
from contrastive.errors import ConfigError
from contrastive.loss import ContrastiveLoss, InfoNCESettings, LossSettings
from contrastive.modalities.base import MODALITIES, Modality, build_modality
from contrastive.model import ContrastiveModel, ContrastiveObjective
from contrastive.optim import NO_DECAY_NAMES, param_groups

log = logging.getLogger("contrastive")


def import_modules(names: Sequence[str]) -> None:
    """Imports user modules (e.g. ones that register a modality or a loss) before anything is built,
    from the working directory too, as `python -m` would (console scripts leave it off sys.path)."""
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(
                f"imports: cannot import {name!r} ({e}); it is looked for in the working directory and on PYTHONPATH"
            ) from e


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
    modality_names: Sequence[str], settings: LossSettings | Mapping[str, Any] | None = None
) -> ContrastiveLoss:
    """The loss `settings` describe (a registered loss's settings, or a mapping of them with its
    `name`; InfoNCE over all pairs when none) over `modality_names`."""
    return ContrastiveLoss(settings if settings is not None else InfoNCESettings(), modality_names)


def build_objective(
    modalities: Mapping[str, Modality], *, embed_dim: int, loss: ContrastiveLoss | None = None
) -> ContrastiveObjective:
    """The towers of `modalities` and the loss (InfoNCE over all pairs unless given)."""
    return ContrastiveObjective(ContrastiveModel(modalities, embed_dim), loss or build_loss(list(modalities)))


def build_optimizer(
    module: torch.nn.Module,
    *,
    optimizer: Callable[..., torch.optim.Optimizer],
    scheduler: Callable[..., Any] | None,
    total_steps: int,
    no_decay: Sequence[str] = NO_DECAY_NAMES,
    towers: Mapping[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, Any]:
    """`optimizer` and `scheduler` are partials (Hydra `_partial_: true`); they receive the parameter
    groups (no weight decay on biases, norms, and parameters named in `no_decay`: embeddings and
    temperatures by default; with `towers` settings, a group per tower and layer scale, see
    towers.layer_scales) and the run's length."""
    from contrastive.optim import scale_learning_rates
    from contrastive.towers import layer_scales

    weight_decay = getattr(optimizer, "keywords", {}).get("weight_decay", 0.0)
    model = getattr(module, "model", module)
    scales = layer_scales(model, towers) if towers and hasattr(model, "encoders") else None
    opt = optimizer(param_groups(module, weight_decay, no_decay, scales))
    scale_learning_rates(opt)
    sched = scheduler(opt, total_steps=total_steps) if scheduler is not None else None
    return opt, sched


def build_dataset(
    spec: Any,
    modalities: Mapping[str, Modality],
    settings: DataConfig,
    *,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    check: bool = True,
    what: str | None = None,
) -> ShardDataset:
    """A rank's loader dataset over `spec` (a directory, or a list of directories or {path, weight}),
    read as `settings` (data.*) say: for training, or (train=False) in order, for evaluation. With
    `check`, the preflight runs first (see contrastive.data.checks)."""
    # an evaluation set without sizes.json is counted as it streams, not read before the first step
    sources = load_sources(spec, num_samples=settings.train_num_samples if train else 0, count=train)
    batch_size = settings.batch_size if train else settings.eval_batch_size
    uncounted = [s for src in sources for s in src.shards if s.samples is None]
    if check and uncounted:
        log.info(
            "%s: %d of its shards are counted as the evaluation reads them (no sizes.json lists them)",
            what or "data.eval",
            len(uncounted),
        )
    elif check:
        preflight(
            sources,
            modalities,
            world_size=world_size,
            num_workers=settings.num_workers,
            batch_size=batch_size,
            what=what or ("data.train" if train else "data.eval"),
            train=train,
        )
    if not train:
        return ShardDataset(
            sources,
            modalities,
            prefetch_bytes=settings.prefetch_mb << 20,
            batch_size=batch_size,
            train=False,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=settings.num_workers,
            max_member_bytes=settings.max_member_mb << 20,
        )
    return ShardDataset(
        sources,
        modalities,
        batch_size=batch_size,
        train=True,
        seed=seed,
        shuffle_buffer=settings.shuffle_buffer,
        rank=rank,
        world_size=world_size,
        num_workers=settings.num_workers,
        resampled=settings.resampled,
        epoch_samples=settings.epoch_samples,
        modality_dropout=settings.modality_dropout,
        prefetch_bytes=settings.prefetch_mb << 20,
        max_member_bytes=settings.max_member_mb << 20,
    )
