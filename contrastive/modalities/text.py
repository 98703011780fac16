"""Text: UTF-8 captions, open_clip's tokenizer, and open_clip's text tower: hand-written sizes, or
any open_clip model's by name (`open_clip=ViT-B-32`, its tokenizer too)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import torch
from torch import nn

from contrastive.modalities.base import Modality, register_modality

CHARS_PER_TOKEN = 16  # characters tokenized per token of context: ample (a BPE token averages ~4)


@register_modality("text")
@dataclass
class Text(Modality):
    extensions = ("txt",)

    # An open_clip model name: the tower, its tokenizer and sizes from open_clip's config of it (the
    # hand-written fields below then follow it); none: the hand-written transformer below.
    open_clip: Optional[str] = None
    # With open_clip: a tag of open_clip's registry (looked up in the Hugging Face cache) or a file.
    pretrained: Optional[str] = None
    quick_gelu: bool = False  # QuickGELU activations (OpenAI's weights); set by the name or tag when they say so
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    # a caption's bytes beyond this are not decoded (scraped alt-text can be megabytes)
    max_bytes: int = 65536

    def __post_init__(self):
        if self.open_clip:
            from contrastive.pretrained import model_config, uses_quick_gelu

            text = model_config(self.open_clip)["text_cfg"]
            for field in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"):
                if isinstance(text.get(field), (int, float)):
                    setattr(self, field, text[field])
            self.quick_gelu = self.quick_gelu or uses_quick_gelu(self.open_clip, self.pretrained)

    @cached_property
    def tokenizer(self):
        """open_clip's tokenizer: the model's own with a name (a Hugging Face one for HF text towers),
        else its BPE tokenizer (the vocabulary ships inside the open_clip wheel)."""
        if self.open_clip:
            import open_clip

            return open_clip.get_tokenizer(self.open_clip)
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.context_length)

    def decode(self, data: bytes, extension: str) -> str:
        # a cut inside a character drops that character ("ignore"), never the caption
        text = data[: self.max_bytes].decode("utf-8", errors="ignore" if len(data) > self.max_bytes else "strict")
        text = text.strip()
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
        # the tokenizer keeps context_length tokens; BPE's cost grows with a word's length squared, so
        # only the characters those tokens can come from are tokenized (a token averages ~4)
        return self.tokenizer([value[: CHARS_PER_TOKEN * self.context_length]])[0]

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.context_length, dtype=torch.long)

    @cached_property
    def open_clip_text_cfg(self) -> dict[str, Any]:
        """The tower as open_clip's `text_cfg` (used to build it, and to export it for open_clip)."""
        if self.open_clip:
            from contrastive.pretrained import model_config

            return model_config(self.open_clip)["text_cfg"]
        return dict(
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            width=self.width,
            heads=self.heads,
            layers=self.layers,
            mlp_ratio=self.mlp_ratio,
        )

    @property
    def custom_text(self) -> bool:
        """open_clip keeps this text tower as a module of its own (`text.*`), not CLIP's top-level keys."""
        from contrastive.pretrained import custom_text

        return bool(self.open_clip) and custom_text(self.open_clip)

    def from_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        return {f"text.{k}": v for k, v in tower.items()} if self.custom_text else dict(tower)

    def pretrained_weights(self) -> dict[str, torch.Tensor] | None:
        """The released weights of the tower (`pretrained`), or None."""
        if not (self.open_clip and self.pretrained):
            return None
        from contrastive.pretrained import tower_weights

        return tower_weights(
            self.open_clip, self.pretrained, "text.", quick_gelu=self.quick_gelu, where="modality.text.pretrained"
        )

    def build_encoder(self, embed_dim: int) -> nn.Module:
        if self.open_clip:
            from contrastive.pretrained import build_model

            return build_model(self.open_clip, quick_gelu=self.quick_gelu, embed_dim=embed_dim).text
        # hand-written sizes: the text tower open_clip's CLIP builds for them
        from contrastive.pretrained import text_transformer

        return text_transformer(embed_dim, self.open_clip_text_cfg, quick_gelu=self.quick_gelu)
