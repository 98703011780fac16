"""Images: Pillow decoding, open_clip's preprocessing, and open_clip's vision transformer.

`preprocess` ends at the pixels: a uint8 [3, H, W] tensor, the crop or resize open_clip's transform
makes, and `on_device` does what its ToTensor and Normalize would (to float, / 255, - mean, / std)
on the batch where the tower runs: a quarter of the bytes from the loader workers to the trainer
and on to the GPU, and the same numbers.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import torch
from PIL import Image as PILImage
from torch import nn

from contrastive.errors import ConfigError
from contrastive.modalities.base import Modality, Refused, register_modality

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision's default; open_clip's)


@register_modality("image")
@dataclass
class Image(Modality):
    extensions = ("jpg", "jpeg", "png", "webp")

    # An open_clip model name: the tower, its sizes and its preprocessing from open_clip's config of it
    # (the hand-written fields below then follow it); none: the hand-written ViT below.
    open_clip: Optional[str] = None
    # With open_clip: a tag of open_clip's registry (looked up in the Hugging Face cache) or a file.
    pretrained: Optional[str] = None
    quick_gelu: bool = False  # QuickGELU activations (OpenAI's weights); set by the name or tag when they say so
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"  # evaluation resize: bicubic | bilinear (training crops are bicubic, as open_clip's)
    resize_mode: str = "shortest"  # evaluation: shortest (resize, centre crop) | longest (pad) | squash
    # RandomResizedCrop scale range of the training transform (open_clip's default).
    train_crop_scale: tuple[float, float] = (0.9, 1.0)
    patch_dropout: float = 0.0
    # Pillow refuses images above this many pixels instead of filling memory (decompression bombs).
    max_pixels: int = 89_478_485

    def __post_init__(self):
        if self.open_clip:
            self._follow_open_clip()
        self._transforms = {}  # train flag -> transform, built on first use
        self._mean_std = {}  # device -> (mean, std), [3, 1, 1] each

    def _follow_open_clip(self) -> None:
        """Sizes and preprocessing from open_clip's config of the name and the tag's, so that the
        recorded fields (checkpoints, exports) describe the tower and its inputs."""
        from contrastive.pretrained import model_config, preprocess_config, uses_quick_gelu

        vision = model_config(self.open_clip)["vision_cfg"]
        pre = preprocess_config(self.open_clip, self.pretrained)
        size = pre["size"]
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ConfigError(
                    f"modality.image.open_clip={self.open_clip}: non-square inputs {size} are not supported"
                )
            size = size[0]
        self.image_size = int(size)
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.interpolation, self.resize_mode = pre["interpolation"], pre["resize_mode"]
        self.quick_gelu = self.quick_gelu or uses_quick_gelu(self.open_clip, self.pretrained)
        for field in ("patch_size", "width", "layers", "head_width", "mlp_ratio"):
            if isinstance(vision.get(field), (int, float)):
                setattr(self, field, vision[field])

    def decode(self, data: bytes, extension: str) -> PILImage.Image:
        """The header's size checked against max_pixels before any pixel is decoded (Pillow's own
        decompression-bomb warning and error become this refusal: nothing is printed)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            try:
                img = PILImage.open(io.BytesIO(data))
            except PILImage.DecompressionBombError as e:
                raise Refused("too_many_pixels", f"image larger than Pillow's limit ({e})") from None
            except PILImage.UnidentifiedImageError:  # its message names a BytesIO object, not the input
                raise ValueError("not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
        if img.width * img.height > self.max_pixels:
            raise Refused("too_many_pixels", f"image of {img.width}x{img.height} pixels is over max_pixels")
        img.load()  # decode now, so corrupt bytes fail here and not inside a transform
        return img.convert("RGB")

    def load(self, item: Any) -> PILImage.Image:
        if isinstance(item, PILImage.Image):
            return item.convert("RGB")
        return super().load(item)

    def transform(self, train: bool):
        """open_clip's own image transform for this size and normalisation (what `preprocess` and
        `on_device` compute together)."""
        if train not in self._transforms:
            from open_clip.transform import AugmentationCfg, image_transform

            self._transforms[train] = image_transform(
                self.image_size,
                is_train=train,
                mean=tuple(self.mean),
                std=tuple(self.std),
                resize_mode=self.resize_mode,
                interpolation=self.interpolation,
                aug_cfg=AugmentationCfg(scale=tuple(self.train_crop_scale)),
            )
        return self._transforms[train]

    def preprocess(self, value: PILImage.Image, *, train: bool) -> torch.Tensor:
        """open_clip's transform. In training it is computed here without torchvision's per-call
        overhead (430-520 -> 160 us for a 32 px image): RandomResizedCrop's crop drawn by the same rule
        from one random draw instead of ~8 one-element tensors, then Pillow's crop and bicubic resize
        and ToTensor + Normalize's arithmetic, all as torchvision does them (same pixels for the same
        crop; tests/test_modalities.py compares the two)."""
        if not train:  # open_clip's evaluation transform up to its ToTensor (resize, crop, RGB)
            for step in self.transform(False).transforms:
                if type(step).__name__ in ("MaybeToTensor", "ToTensor"):
                    break
                value = step(value)
            return self.to_tensor(value)
        if value.mode != "RGB":
            value = value.convert("RGB")
        top, left, height, width = self.crop_box(value.width, value.height)
        value = value.crop((left, top, left + width, top + height))
        size = self.image_size
        if value.size != (size, size):
            value = value.resize((size, size), PILImage.BICUBIC)
        return self.to_tensor(value)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params (top, left, height, width) for this image."""
        area = width * height
        lo, hi = self.train_crop_scale
        log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        draws = torch.rand(10, 4, dtype=torch.float64).tolist()
        for u_area, u_ratio, u_top, u_left in draws:
            target_area = area * (lo + (hi - lo) * u_area)
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        ratio = width / height  # no draw fitted: the central crop, as torchvision falls back to
        lo_ratio, hi_ratio = CROP_RATIO
        if ratio < lo_ratio:
            w, h = width, int(round(width / lo_ratio))
        elif ratio > hi_ratio:
            w, h = int(round(height * hi_ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def to_tensor(self, value: PILImage.Image) -> torch.Tensor:
        """The RGB pixels as uint8 [3, H, W] (ToTensor's layout; its arithmetic is `on_device`'s)."""
        if value.mode != "RGB":
            value = value.convert("RGB")
        pixels = torch.frombuffer(bytearray(value.tobytes()), dtype=torch.uint8)
        return pixels.view(value.height, value.width, 3).permute(2, 0, 1).contiguous()

    def on_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """ToTensor then Normalize on a uint8 batch, the same operations on the same dtypes; a float
        batch (already normalised: a user's own tensors) passes as it is."""
        if inputs.dtype != torch.uint8:
            return inputs
        if inputs.device not in self._mean_std:
            shape = (-1, 1, 1)
            self._mean_std[inputs.device] = (
                torch.tensor(self.mean, device=inputs.device).view(shape),
                torch.tensor(self.std, device=inputs.device).view(shape),
            )
        mean, std = self._mean_std[inputs.device]
        return inputs.float().div(255).sub_(mean).div_(std)

    def empty(self) -> torch.Tensor:
        return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mean_std"] = {}  # device tensors stay in this process (spawned loader workers get none)
        return state

    @cached_property
    def open_clip_vision_cfg(self) -> dict[str, Any]:
        """The tower as open_clip's `vision_cfg` (used to build it, and to export it for open_clip)."""
        if self.open_clip:
            from contrastive.pretrained import model_config

            return model_config(self.open_clip)["vision_cfg"]
        return dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            layers=self.layers,
            head_width=self.head_width,
            mlp_ratio=self.mlp_ratio,
            patch_dropout=self.patch_dropout,
        )

    def from_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This tower's weights from an open_clip CLIP state dict (its `visual.*` entries)."""
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}

    def to_open_clip(self, tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"visual.{k}": v for k, v in tower.items()}

    def pretrained_weights(self) -> dict[str, torch.Tensor] | None:
        """The released weights of the tower (`pretrained`), or None."""
        if not (self.open_clip and self.pretrained):
            return None
        from contrastive.pretrained import tower_weights

        return tower_weights(
            self.open_clip, self.pretrained, "visual.", quick_gelu=self.quick_gelu, where="modality.image.pretrained"
        )

    def build_encoder(self, embed_dim: int) -> nn.Module:
        if self.open_clip:
            from contrastive.pretrained import build_model

            return build_model(self.open_clip, quick_gelu=self.quick_gelu, embed_dim=embed_dim).visual
        # hand-written sizes: the vision tower open_clip's CLIP builds for them
        from contrastive.pretrained import vision_transformer

        return vision_transformer(embed_dim, self.open_clip_vision_cfg, quick_gelu=self.quick_gelu)
