"""Text: UTF-8 captions, open_clip's bundled BPE tokenizer, and open_clip's text transformer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from contrastive.modalities.base import Modality, register_modality


@register_modality("text")
@dataclass
class Text(Modality):
    extensions = ("txt",)

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    @cached_property
    def tokenizer(self):
        """open_clip's BPE tokenizer (its vocabulary ships inside the open_clip wheel)."""
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.context_length)

    def decode(self, data: bytes, extension: str) -> str:
        text = data.decode("utf-8").strip()
        if not text:
            raise ValueError("empty text")
        return text

    def load(self, item: Any) -> str:
        if isinstance(item, str):  # a caption, not a path
            return item
        return super().load(item)

    def alternatives(self, value: str) -> list[str]:
        """One caption a line (CLIP_benchmark's retrieval sets store an image's captions so)."""
        return [line.strip() for line in value.splitlines() if line.strip()] or [value]

    def preprocess(self, value: str, *, train: bool) -> torch.Tensor:
        return self.tokenizer([value])[0]

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.context_length, dtype=torch.long)

    @cached_property
    def open_clip_text_cfg(self) -> dict[str, Any]:
        """The tower as open_clip's `text_cfg` (used to build it, and to export it for open_clip)."""
        return dict(
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            width=self.width,
            heads=self.heads,
            layers=self.layers,
            mlp_ratio=self.mlp_ratio,
        )

    def from_open_clip(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This tower's weights from an open_clip state dict: CLIP keeps the text tower's tensors at
        the top level (token_embedding, transformer, ln_final, text_projection, ...), CustomTextCLIP
        under `text.`."""
        if any(k.startswith("text.") for k in state):
            return {k[len("text.") :]: v for k, v in state.items() if k.startswith("text.")}
        return {
            k: v
            for k, v in state.items()
            if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias", "attn_mask")
        }

    def to_open_clip(self, tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tower)

    def build_encoder(self, embed_dim: int) -> nn.Module:
        from open_clip.model import CLIPTextCfg, _build_text_tower

        return _build_text_tower(embed_dim, CLIPTextCfg(**self.open_clip_text_cfg))
