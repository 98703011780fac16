"""Images: Pillow decoding, open_clip's preprocessing, and open_clip's vision transformer."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from PIL import Image as PILImage
from torch import nn

from contrastive.modalities.base import Modality, register_modality

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@register_modality("image")
@dataclass
class Image(Modality):
    extensions = ("jpg", "jpeg", "png", "webp")

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    # RandomResizedCrop scale range of the training transform (open_clip's default).
    train_crop_scale: tuple[float, float] = (0.9, 1.0)
    patch_dropout: float = 0.0
    # Pillow refuses images above this many pixels instead of filling memory (decompression bombs).
    max_pixels: int = 89_478_485

    def __post_init__(self):
        self._transforms = {}  # train flag -> transform, built on first use

    def decode(self, data: bytes, extension: str) -> PILImage.Image:
        img = PILImage.open(io.BytesIO(data))
        if img.width * img.height > self.max_pixels:
            raise ValueError(f"image of {img.width}x{img.height} pixels is larger than max_pixels")
        img.load()  # decode now, so corrupt bytes fail here and not inside a transform
        return img.convert("RGB")

    def load(self, item: Any) -> PILImage.Image:
        if isinstance(item, PILImage.Image):
            return item.convert("RGB")
        return super().load(item)

    def transform(self, train: bool):
        """open_clip's own image transform for this size and normalisation."""
        if train not in self._transforms:
            from open_clip.transform import AugmentationCfg, image_transform

            self._transforms[train] = image_transform(
                self.image_size,
                is_train=train,
                mean=tuple(self.mean),
                std=tuple(self.std),
                aug_cfg=AugmentationCfg(scale=tuple(self.train_crop_scale)),
            )
        return self._transforms[train]

    def preprocess(self, value: PILImage.Image, *, train: bool) -> torch.Tensor:
        return self.transform(train)(value)

    def empty(self) -> torch.Tensor:
        return torch.zeros(3, self.image_size, self.image_size)

    @cached_property
    def open_clip_vision_cfg(self) -> dict[str, Any]:
        """The tower as open_clip's `vision_cfg` (used to build it, and to export it for open_clip)."""
        return dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            layers=self.layers,
            head_width=self.head_width,
            mlp_ratio=self.mlp_ratio,
            patch_dropout=self.patch_dropout,
        )

    def from_open_clip(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This tower's weights from an open_clip CLIP state dict (its `visual.*` entries)."""
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}

    def to_open_clip(self, tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"visual.{k}": v for k, v in tower.items()}

    def build_encoder(self, embed_dim: int) -> nn.Module:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        return _build_vision_tower(embed_dim, CLIPVisionCfg(**self.open_clip_vision_cfg))
