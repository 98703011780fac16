"""Towers by open_clip model name, and released weights resolved the way open_clip resolves them.

    modality.image.open_clip=ViT-B-32 modality.image.pretrained=laion2b_s34b_b79k
    modality.text.open_clip=ViT-B-32  modality.text.pretrained=laion2b_s34b_b79k

A name builds the tower through open_clip's public factory (`create_model`, the text tower as a
module of its own: `force_custom_text`) from open_clip's own config of that name: any architecture
it has (ViTs, timm towers such as ConvNeXt, SigLIP towers, Hugging Face text towers where
`transformers` is installed), QuickGELU where the config or the weights' tag says so, and the
preprocessing (size, mean, std, interpolation, resize mode) of the config and the tag.

`pretrained` is a tag of open_clip's registry, looked up in the standard Hugging Face cache (so it
works offline, `HF_HUB_OFFLINE=1`, when the file is cached; one clear error names the file and the
cache directory otherwise), or a local file. The weights load through open_clip's own
`load_checkpoint` (its key conversions, positional-embedding resizing) into a whole model, from which
each tower takes its part.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from contrastive.modalities.base import ConfigError

log = logging.getLogger("contrastive")


def model_config(name: str) -> dict[str, Any]:
    """open_clip's config of `name` (a copy), or a ConfigError listing where to look."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(
            f"open_clip has no model {name!r} (open_clip.list_models() lists its names; "
            "open_clip.add_model_config adds your own)"
        )
    return deepcopy(cfg)


def tag_config(name: str, pretrained: str | None) -> dict[str, Any]:
    """The registry entry of tag `pretrained` for `name` ({} for a file or no weights)."""
    import open_clip

    if not pretrained or Path(pretrained).is_file():
        return {}
    return dict(open_clip.get_pretrained_cfg(name, pretrained))


def uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """QuickGELU where the config or the weights' tag says so (OpenAI's weights were trained with it:
    loaded into GELU towers they would give a wrong model without any error)."""
    return bool(model_config(name).get("quick_gelu") or tag_config(name, pretrained).get("quick_gelu"))


def custom_text(name: str) -> bool:
    """Whether open_clip keeps the text tower of `name` as a module of its own (`text.*`)."""
    cfg = model_config(name)
    return bool(cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {}))


def preprocess_config(name: str, pretrained: str | None) -> dict[str, Any]:
    """size, mean, std, interpolation and resize_mode: open_clip's defaults, the model config's, the tag's."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = model_config(name)
    merged = merge_preprocess_dict(asdict(PreprocessCfg()), cfg.get("preprocess_cfg", {}))
    merged = merge_preprocess_dict(merged, tag_config(name, pretrained))
    merged["size"] = cfg["vision_cfg"].get("image_size", merged["size"])
    return merged


@contextlib.contextmanager
def _quiet_factory():
    """open_clip logs at INFO/WARNING about weights it was told not to load."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(name: str, *, quick_gelu: bool, embed_dim: int | None = None) -> torch.nn.Module:
    """The whole open_clip model of `name`, randomly initialised, its text tower a module (`.text`)."""
    import open_clip

    kwargs = {} if embed_dim is None else {"embed_dim": embed_dim}
    # where tensors are made now: the meta device when FLOPs are counted (contrastive.flops)
    kwargs["device"] = torch.empty(0).device
    with _quiet_factory():
        return open_clip.create_model(
            name, pretrained=None, load_weights=False, force_custom_text=True, force_quick_gelu=quick_gelu, **kwargs
        )


def cache_directory() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_weights(name: str, pretrained: str, *, where: str) -> str:
    """A local file: itself. A tag: its file in the Hugging Face cache, downloaded unless offline."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if Path(pretrained).is_file():
        return pretrained
    cfg = tag_config(name, pretrained)
    if not cfg:
        raise ConfigError(
            f"{where}={pretrained!r}: neither a file nor a tag of {name}; its tags: "
            f"{open_clip.list_pretrained_tags_by_model(name)}"
        )
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise ConfigError(
            f"{where}={pretrained!r}: {name}/{pretrained} is not on the Hugging Face hub; "
            "download its file and give its path"
        )
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hub)
    names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    for candidate in names:
        found = try_to_load_from_cache(repo, candidate)
        if isinstance(found, str):
            return found
    expected = " or ".join(f"{repo}/{n}" for n in names)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline:
        try:
            return open_clip.download_pretrained(cfg)
        except Exception as e:  # noqa: BLE001 - said below, with the file and the cache
            reason = f"downloading failed ({type(e).__name__}: {e})"
    else:
        reason = "HF_HUB_OFFLINE=1"
    raise ConfigError(
        f"{where}={pretrained!r}: the weights of {name}/{pretrained} are not in the Hugging Face "
        f"cache: expected {expected} under {cache_directory()} ({reason}). Download it once where a "
        f"network is, or give a local file: {where}=/path/to/{names[0]}"
    )


@functools.lru_cache(maxsize=2)
def pretrained_state(name: str, pretrained: str, quick_gelu: bool, where: str) -> dict[str, torch.Tensor]:
    """The whole model's weights (`visual.*`, `text.*`, ...) after open_clip's load_checkpoint; kept for
    the image and the text tower to share one load."""
    import open_clip

    path = resolve_weights(name, pretrained, where=where)
    model = build_model(name, quick_gelu=quick_gelu)
    open_clip.load_checkpoint(model, path, strict=True)
    log.info("loaded %s weights %s from %s", name, pretrained, path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tower_weights(name: str, pretrained: str, prefix: str, *, quick_gelu: bool, where: str) -> dict[str, torch.Tensor]:
    """One tower's part (`visual.` or `text.`) of the released weights."""
    state = pretrained_state(name, pretrained, quick_gelu, where)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
