"""Tower control: initialise a tower from a local file, freeze it (or all but its last blocks), and
turn on activation checkpointing. Works on any tower: open_clip's, timm's, or a user modality's."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from contrastive.modalities.base import ConfigError, Modality

log = logging.getLogger("contrastive")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def tower_state(name: str, modality: Modality, path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of tower `name` from `path`: one of our exports (a directory), a file holding our
    model's weights (`encoders.<name>.*`), an open_clip checkpoint (the modality maps its keys), or a
    bare state dict of the tower itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise ConfigError(f"model.towers.{name}.init: {path} does not exist")
    state = _read_state_dict(path)
    for prefix in (f"encoders.{name}.", f"model.encoders.{name}."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    from_open_clip = getattr(modality, "from_open_clip", None)
    if from_open_clip is not None:
        mapped = from_open_clip(state)
        if mapped:
            return mapped
    return state


def init_tower(name: str, encoder: nn.Module, modality: Modality, path: str | Path) -> None:
    state = tower_state(name, modality, path)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        raise ConfigError(
            f"model.towers.{name}.init: {path} does not fit the {name} tower: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}, other shapes {shapes[:8]}"
        )
    encoder.load_state_dict(state)
    log.info("initialised the %s tower from %s (%d tensors)", name, path, len(state))


def _blocks(encoder: nn.Module) -> nn.Module | None:
    """The tower's stack of transformer blocks: among lists of two or more modules of one class,
    the one holding the most parameters (a block's own small Sequential, e.g. an MLP, loses)."""
    stacks = [
        m
        for m in encoder.modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2 and len({type(c) for c in m}) == 1
    ]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _after_blocks(encoder: nn.Module, blocks: nn.Module) -> list[nn.Parameter]:
    """Parameters that act after the blocks: those of modules registered after the block stack
    (final norm, pooling, head) and the tower's own projection tensors (open_clip's `proj`,
    `text_projection`)."""
    inside = {id(m) for m in blocks.modules()}
    seen_blocks, after = False, []
    for module in encoder.modules():
        if id(module) in inside:
            seen_blocks = True
        elif seen_blocks and not any(id(m) in inside for m in module.modules()):
            after.extend(module.parameters(recurse=False))
    after.extend(p for name, p in encoder.named_parameters(recurse=False) if "proj" in name or "head" in name)
    return after


def freeze_tower(name: str, encoder: nn.Module, unlocked_blocks: int = 0) -> int:
    """Freezes the tower, except its last `unlocked_blocks` blocks and what acts after them (final
    norm, pooling, projection). Returns the number of trainable tensors left."""
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad = False
    if unlocked_blocks > 0:
        blocks = _blocks(encoder)
        if blocks is None:
            raise ConfigError(f"model.towers.{name}.unlocked_blocks: the {name} tower has no block list")
        unlocked_blocks = min(unlocked_blocks, len(blocks))
        for p in [p for block in list(blocks)[-unlocked_blocks:] for p in block.parameters()] + _after_blocks(
            encoder, blocks
        ):
            p.requires_grad = True
    trainable = sum(p.requires_grad for p in params)
    log.info(
        "%s tower frozen%s: %d of %d tensors train",
        name,
        f" but its last {unlocked_blocks} blocks" if unlocked_blocks else "",
        trainable,
        len(params),
    )
    return trainable


@dataclass
class TowerSettings:
    """`model.towers.<name>`: how one tower starts and trains."""

    init: Optional[str] = None  # a file or export to initialise the tower from (see tower_state)
    freeze: bool = False  # no gradient for the tower...
    unlocked_blocks: int = 0  # ...except its last N blocks and what acts after them (LiT)
    grad_checkpointing: bool = False  # activation checkpointing inside the tower
    compile: Any = False  # torch.compile the tower in place: true, or torch.compile's keyword arguments


def apply_tower_settings(model: Any, settings: Mapping[str, TowerSettings | Mapping[str, Any]]) -> None:
    """model.towers.<name>: init, freeze (unlocked_blocks), grad_checkpointing, compile, in that order."""
    for name, tower in settings.items():
        if name not in model.encoders:
            raise ConfigError(f"model.towers.{name}: no such tower among {list(model.encoders)}")
        if not isinstance(tower, TowerSettings):
            known = {f.name for f in dataclasses.fields(TowerSettings)}
            unknown = sorted(set(tower) - known)
            if unknown:
                raise ConfigError(f"model.towers.{name}: unknown key(s) {unknown}; a tower takes {sorted(known)}")
            tower = TowerSettings(**tower)
        if tower.init:
            init_tower(name, model.encoders[name], model.modalities[name], tower.init)
        if tower.freeze:
            freeze_tower(name, model.encoders[name], tower.unlocked_blocks)
        if tower.grad_checkpointing:
            model.set_grad_checkpointing([name])
        if tower.compile:
            # In place (nn.Module.compile): parameter names, checkpoints and exports stay as they are.
            # The first steps pay the compilation (inductor; needs a C++ compiler on CPU).
            model.encoders[name].compile(**({} if tower.compile is True else dict(tower.compile)))
