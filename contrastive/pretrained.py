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

The image and the text tower of one open_clip model come from one model built once and one load of
its weights (`build_model`, `pretrained_state` keep the last of each until `release()`, which the
model calls once its towers are built and the weights are in them): at ViT-bigG on 8 ranks a node,
building or loading it twice would double the host memory.
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

from contrastive.errors import ConfigError

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
    """The whole open_clip model of `name`, randomly initialised, its text tower a module (`.text`);
    the same object for the towers of one model (until `release()`)."""
    # where tensors are made now: the meta device when FLOPs are counted (contrastive.flops)
    return _built(name, quick_gelu, embed_dim, str(torch.empty(0).device))


@functools.lru_cache(maxsize=1)
def _built(name: str, quick_gelu: bool, embed_dim: int | None, device: str) -> torch.nn.Module:
    import open_clip

    kwargs = {} if embed_dim is None else {"embed_dim": embed_dim}
    with _quiet_factory():
        return open_clip.create_model(
            name,
            pretrained=None,
            load_weights=False,
            force_custom_text=True,
            force_quick_gelu=quick_gelu,
            device=device,
            **kwargs,
        )


def release() -> None:
    """Forgets the model and the weights kept for the towers of one model to share."""
    _built.cache_clear()
    _loaded.cache_clear()


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


def pretrained_state(name: str, pretrained: str, quick_gelu: bool, where: str) -> dict[str, torch.Tensor]:
    """The whole model's weights (`visual.*`, `text.*`, ...) after open_clip's load_checkpoint, loaded
    once for every tower of the model (until `release()`); `where` names the setting in errors."""
    path = resolve_weights(name, pretrained, where=where)
    return _loaded(name, path, pretrained, quick_gelu)


@functools.lru_cache(maxsize=1)
def _loaded(name: str, path: str, pretrained: str, quick_gelu: bool) -> dict[str, torch.Tensor]:
    import open_clip

    model = _built.__wrapped__(name, quick_gelu, None, "cpu")  # a model of its own, dropped after the load
    open_clip.load_checkpoint(model, path, strict=True)
    log.info("loaded %s weights %s from %s", name, pretrained, path)
    return {k: v.detach() for k, v in model.state_dict().items()}


def released_logit_scale(name: str, pretrained: str, *, quick_gelu: bool, where: str) -> float:
    """The released model's own logit scale, exp(logit_scale) (~100 for OpenAI's and LAION's CLIPs)."""
    state = pretrained_state(name, pretrained, quick_gelu, where)
    return float(state["logit_scale"].exp())


def tower_weights(name: str, pretrained: str, prefix: str, *, quick_gelu: bool, where: str) -> dict[str, torch.Tensor]:
    """One tower's part (`visual.` or `text.`) of the released weights."""
    state = pretrained_state(name, pretrained, quick_gelu, where)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def vision_transformer(embed_dim: int, vision_cfg: dict[str, Any], *, quick_gelu: bool) -> torch.nn.Module:
    """open_clip's VisionTransformer for the plain ViT `vision_cfg` of hand-written sizes, with the
    arguments open_clip's CLIP gives it for that config (so the same seed gives the same weights)."""
    from open_clip.model import CLIPVisionCfg
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

    cfg = CLIPVisionCfg(**vision_cfg)
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.width // cfg.head_width,
        mlp_ratio=cfg.mlp_ratio,
        ls_init_value=cfg.ls_init_value,
        patch_dropout=cfg.patch_dropout,
        attentional_pool=cfg.attentional_pool,
        attn_pooler_queries=cfg.attn_pooler_queries,
        attn_pooler_heads=cfg.attn_pooler_heads,
        pos_embed_type=cfg.pos_embed_type,
        no_ln_pre=cfg.no_ln_pre,
        final_ln_after_pool=cfg.final_ln_after_pool,
        pool_type=cfg.pool_type,
        output_tokens=cfg.output_tokens,
        output_dim=embed_dim,
        act_layer=QuickGELU if quick_gelu else torch.nn.GELU,
        norm_layer=LayerNorm,
    )


def text_transformer(embed_dim: int, text_cfg: dict[str, Any], *, quick_gelu: bool) -> torch.nn.Module:
    """open_clip's TextTransformer for the `text_cfg` of hand-written sizes, with the arguments open_clip's
    CLIP gives it for that config (so the same seed gives the same weights)."""
    from open_clip.model import CLIPTextCfg
    from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

    cfg = CLIPTextCfg(**text_cfg)
    return TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        ls_init_value=cfg.ls_init_value,
        output_dim=embed_dim,
        embed_cls=cfg.embed_cls,
        no_causal_mask=cfg.no_causal_mask,
        pad_id=cfg.pad_id,
        eos_id=cfg.eos_id,
        pool_type=cfg.pool_type,
        proj_type=cfg.proj_type,
        proj_bias=cfg.proj_bias,
        output_tokens=cfg.output_tokens,
        act_layer=QuickGELU if quick_gelu else torch.nn.GELU,
        norm_layer=LayerNorm,
    )
