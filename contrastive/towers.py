"""Tower control (`model.towers.<name>`): where a tower's weights start (its modality's released
weights, a local file or export, another open_clip model), LoRA adapters (PEFT), freezing (all but the
last blocks), a learning-rate scale and layer-wise decay, activation checkpointing, torch.compile.
Works on any tower: open_clip's, timm's, or a user modality's."""

from __future__ import annotations

import dataclasses
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.modalities.base import Modality

log = logging.getLogger("contrastive")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A third party's weights file: safetensors, or a torch file read with weights_only (tensors and
    plain containers only: a pickle that could run code is refused, named)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{path} holds more than tensors (pickled objects, which could run code when loaded), so it is not "
            f"read. Save its state dict alone (torch.save(model.state_dict(), ...)) or as safetensors. ({e})"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


OPEN_CLIP_SOURCE = "open_clip:"  # init=open_clip:<name>[:<tag or file>]: another open_clip model's weights


def tower_state(name: str, modality: Modality, path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of tower `name` from `path`: one of our exports (a directory), a file holding our
    model's weights (`encoders.<name>.*`), another model's checkpoint whose layout the modality maps
    (`Modality.from_checkpoint`: open_clip's for images and text, AST's or an image ViT's for audio),
    `open_clip:<name>[:<tag>]` (a released open_clip model, through the Hugging Face cache), or a bare
    state dict of the tower itself."""
    where = f"model.towers.{name}.init"
    if str(path).startswith(OPEN_CLIP_SOURCE):
        from contrastive.pretrained import pretrained_state, uses_quick_gelu

        model_name, _, pretrained = str(path)[len(OPEN_CLIP_SOURCE) :].partition(":")
        if not pretrained:
            raise ConfigError(f"{where}={path}: give the weights, {OPEN_CLIP_SOURCE}<name>:<tag or file>")
        state = pretrained_state(model_name, pretrained, uses_quick_gelu(model_name, pretrained), where)
    else:
        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.exists():
            raise ConfigError(f"{where}: {path} does not exist")
        state = _read_state_dict(path)
    for prefix in (f"encoders.{name}.", f"model.encoders.{name}."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    mapped = modality.from_checkpoint(state)
    return mapped if mapped else state


def load_tower(
    where: str,
    name: str,
    encoder: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: Any,
    fresh: tuple[str, ...] = (),
) -> None:
    """Loads `state` into the tower, or a ConfigError listing what does not fit; the keys in `fresh`
    may be missing (they keep their initialisation)."""
    own = encoder.state_dict()
    kept = sorted(k for k in set(own) - set(state) if k in fresh)
    missing = sorted(set(own) - set(state) - set(kept))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{where}: {source} does not fit the {name} tower: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"other shapes {shapes[:8]} (a projection of another width: model.embed_dim)"
        )
    encoder.load_state_dict(state, strict=not kept)
    log.info(
        "initialised the %s tower from %s (%d tensors%s)",
        name,
        source,
        len(state),
        f"; starting fresh: {', '.join(kept)}" if kept else "",
    )


def init_tower(name: str, encoder: nn.Module, modality: Modality, path: str | Path) -> None:
    load_tower(
        f"model.towers.{name}.init", name, encoder, tower_state(name, modality, path), path, fresh=modality.fresh_keys
    )


def load_released_weights(model: Any) -> None:
    """Each modality's released weights (`modality.<name>.pretrained`) into its tower."""
    for name, modality in model.modalities.items():
        state = modality.pretrained_weights()
        if state is not None:
            load_tower(f"modality.{name}.pretrained", name, model.encoders[name], state, modality.pretrained)
    from contrastive.pretrained import release

    release()  # the towers hold the weights now


def _stack(encoder: nn.Module) -> nn.Module | None:
    """The tower's biggest stack of blocks: among lists of two or more modules of one class, the one
    holding the most parameters (a block's own small Sequential, e.g. an MLP, loses)."""
    stacks = [
        m
        for m in encoder.modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2 and len({type(c) for c in m}) == 1
    ]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _blocks(encoder: nn.Module) -> list[nn.Module] | None:
    """The tower's blocks in order: every module of the biggest stack's block class, in all its stages
    (a ViT's one list of blocks; a ResNet's bottlenecks across layer1..layer4)."""
    stack = _stack(encoder)
    if stack is None:
        return None
    kind = type(next(iter(stack)))
    return [m for m in encoder.modules() if type(m) is kind]


def _after_blocks(encoder: nn.Module, blocks: list[nn.Module]) -> list[nn.Parameter]:
    """Parameters that act after the blocks: those of modules registered after the last block (final
    norm, pooling, head) and the tower's own projection tensors (open_clip's `proj`,
    `text_projection`)."""
    inside = {id(m) for block in blocks for m in block.modules()}
    last = {id(m) for m in blocks[-1].modules()}
    seen_last, after = False, []
    for module in encoder.modules():
        if id(module) in last:
            seen_last = True
        elif seen_last and not any(id(m) in inside for m in module.modules()):
            after.extend(module.parameters(recurse=False))
    after.extend(p for name, p in encoder.named_parameters(recurse=False) if "proj" in name or "head" in name)
    return after


def layers(encoder: nn.Module) -> tuple[dict[int, int], int] | None:
    """(id(parameter) -> its layer, the top layer): 0 for what comes before the blocks (embeddings, a
    stem), 1..L for the blocks, L + 1 = top for what comes after them (final norm, pooling,
    projection); None for a tower without blocks. A timm trunk (open_clip's ConvNeXt, a ResNet by
    timm's name...) is grouped by timm's own `group_matcher`, as timm's layer decay groups it: its
    stem 0, its stages' blocks, its head last; the projection open_clip adds after it is top."""
    trunk = getattr(encoder, "trunk", None)
    if trunk is not None and hasattr(trunk, "group_matcher"):
        from timm.models import group_parameters

        layer_map = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
        top = max(layer_map.values())
        named = dict(trunk.named_parameters())
        depth = {id(p): top for p in encoder.parameters()}
        depth.update({id(named[name]): layer for name, layer in layer_map.items() if name in named})
        return depth, top
    blocks = _blocks(encoder)
    if blocks is None:
        return None
    depth = {id(p): 0 for p in encoder.parameters()}
    for i, block in enumerate(blocks):
        depth.update({id(p): i + 1 for p in block.parameters()})
    depth.update({id(p): len(blocks) + 1 for p in _after_blocks(encoder, blocks)})
    return depth, len(blocks) + 1


def freeze_tower(name: str, encoder: nn.Module, unlocked_blocks: int = 0) -> int:
    """Freezes the tower, except its last `unlocked_blocks` blocks and what acts after them (final
    norm, pooling, projection). Returns the number of trainable tensors left."""
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad = False
    if unlocked_blocks > 0:
        found = layers(encoder)
        if found is None:
            raise ConfigError(f"model.towers.{name}.unlocked_blocks: the {name} tower has no block list")
        depth, top = found
        unlocked_blocks = min(unlocked_blocks, top - 1)
        for p in params:
            p.requires_grad = depth[id(p)] >= top - unlocked_blocks
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
class LoraSettings:
    """`model.towers.<name>.lora`: LoRA adapters through PEFT; the tower's own weights stay frozen."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module names (suffixes) to adapt; none: every Linear layer inside the tower's blocks
    targets: Optional[List[str]] = None


@dataclass
class TowerSettings:
    """`model.towers.<name>`: how one tower starts and trains."""

    init: Optional[str] = None  # a file, an export or open_clip:<name>:<tag> to start from (see tower_state)
    freeze: bool = False  # no gradient for the tower...
    unlocked_blocks: int = 0  # ...except its last N blocks and what acts after them (LiT)
    lr_scale: float = 1.0  # the tower's learning rate, as a multiple of optim.optimizer.lr
    layer_decay: float = 1.0  # layer-wise decay: block i of L trains at lr_scale x layer_decay^(L + 1 - i)
    lora: Optional[Dict[str, Any]] = None  # LoRA adapters: the fields of LoraSettings ({} for its defaults)
    grad_checkpointing: bool = False  # activation checkpointing inside the tower
    compile: Any = False  # torch.compile the tower in place: true, or torch.compile's keyword arguments


def tower_settings(name: str, fields: TowerSettings | Mapping[str, Any]) -> TowerSettings:
    """Typed settings, a key that no setting has named by its full name."""
    if isinstance(fields, TowerSettings):
        return fields
    known = {f.name for f in dataclasses.fields(TowerSettings)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"model.towers.{name}: unknown key(s) {unknown}; a tower takes {sorted(known)}")
    return TowerSettings(**fields)


def _block_stack(encoder: nn.Module) -> tuple[str, nn.Module] | None:
    blocks = _stack(encoder)
    return None if blocks is None else next((n, m) for n, m in encoder.named_modules() if m is blocks)


def apply_lora(name: str, model: Any, fields: Mapping[str, Any]) -> None:
    """Wraps the tower in PEFT's LoRA model: only the adapters train; `merge_lora` folds them back."""
    known = {f.name for f in dataclasses.fields(LoraSettings)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"model.towers.{name}.lora: unknown key(s) {unknown}; LoRA takes {sorted(known)}")
    lora = LoraSettings(**fields)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError(f"model.towers.{name}.lora needs PEFT: pip install 'contrastive[lora]' ({e})") from e
    encoder = model.encoders[name]
    targets = lora.targets
    if not targets:
        stack = _block_stack(encoder)
        if stack is None:
            raise ConfigError(f"model.towers.{name}.lora: the {name} tower has no block list; name lora.targets")
        targets = [f"{stack[0]}.{n}" for n, m in stack[1].named_modules() if isinstance(m, nn.Linear)]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")
    model.encoders[name] = get_peft_model(encoder, config)
    trainable = sum(p.numel() for p in model.encoders[name].parameters() if p.requires_grad)
    log.info("%s tower: LoRA r=%d on %d modules, %d trainable parameters", name, lora.r, len(targets), trainable)


def merge_lora(model: Any) -> None:
    """Folds every tower's LoRA adapters into its weights (the plain tower's keys again)."""
    for name, encoder in list(model.encoders.items()):
        if hasattr(encoder, "merge_and_unload"):
            model.encoders[name] = encoder.merge_and_unload()


def apply_structure(model: Any, settings: Mapping[str, TowerSettings | Mapping[str, Any]]) -> None:
    """What changes a tower's parameters (LoRA adapters): also applied when a checkpoint is read back."""
    for name, fields in settings.items():
        tower = tower_settings(name, fields)
        if tower.lora is not None:
            apply_lora(name, model, tower.lora)


def layer_scales(model: Any, settings: Mapping[str, TowerSettings | Mapping[str, Any]]) -> dict[int, tuple[str, float]]:
    """id(parameter) -> (its tower, its learning-rate scale) for the towers with lr_scale or layer_decay:
    lr_scale x layer_decay^(L + 1 - depth), depth 0 for what comes before the L blocks (embeddings),
    i for block i, L + 1 for what comes after them (final norm, projection)."""
    out: dict[int, tuple[str, float]] = {}
    for name, fields in settings.items():
        tower = tower_settings(name, fields)
        if tower.lr_scale == 1.0 and tower.layer_decay == 1.0:
            continue
        encoder = model.encoders[name]
        depth, top = {id(p): 0 for p in encoder.parameters()}, 0
        if tower.layer_decay != 1.0:
            found = layers(encoder)
            if found is None:
                raise ConfigError(f"model.towers.{name}.layer_decay: the {name} tower has no block list")
            depth, top = found
        for p in encoder.parameters():
            out[id(p)] = (name, tower.lr_scale * tower.layer_decay ** (top - depth[id(p)]))
    return out


def apply_tower_settings(model: Any, settings: Mapping[str, TowerSettings | Mapping[str, Any]]) -> None:
    """model.towers.<name>, in this order: init, LoRA, freeze (unlocked_blocks), grad_checkpointing,
    compile. The learning-rate settings act in the optimizer's groups (contrastive.optim)."""
    for name in settings:
        if name not in model.encoders:
            raise ConfigError(f"model.towers.{name}: no such tower among {list(model.encoders)}")
    for name, fields in settings.items():
        tower = tower_settings(name, fields)
        if tower.init:
            init_tower(name, model.encoders[name], model.modalities[name], tower.init)
    apply_structure(model, settings)
    for name, fields in settings.items():
        tower = tower_settings(name, fields)
        if tower.freeze:
            if not tower.init and not getattr(model.modalities[name], "pretrained", None):
                log.warning(
                    "the %s tower is frozen at its random initialisation: give it weights "
                    "(model.towers.%s.init, or modality.%s.pretrained)",
                    name,
                    name,
                    name,
                )
            freeze_tower(name, model.encoders[name], tower.unlocked_blocks)
        if tower.grad_checkpointing:
            model.set_grad_checkpointing([name])
        if tower.compile:
            # In place (nn.Module.compile): parameter names, checkpoints and exports stay as they are.
            # The first steps pay the compilation (inductor; needs a C++ compiler on CPU).
            model.encoders[name].compile(**({} if tower.compile is True else dict(tower.compile)))


def unmask(model: nn.Module) -> int:
    """Turns off every patch dropout in `model` (open_clip's and timm's PatchDropout: FLIP's unmasked
    tuning at the end of training, `trainer.unmasked_steps`); returns how many were on."""
    on = 0
    for module in model.modules():
        if type(module).__name__ == "PatchDropout" and getattr(module, "prob", 0.0) > 0:
            module.prob = 0.0
            on += 1
    return on
