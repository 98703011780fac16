"""The modality contract and its registry.

A modality is one file: a dataclass that subclasses `Modality`, registers itself by name and says
which shard keys hold it, how their bytes decode, how a decoded value becomes a model input, and
which encoder embeds it. The rest of the code never names a modality; it loops over dicts keyed by
modality name.

    @register_modality("depth")
    @dataclass
    class Depth(Modality):
        extensions = ("depth.npy",)
        size: int = 32
        ...
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from contrastive.errors import ConfigError

MODALITIES: dict[str, type["Modality"]] = {}


class ModalityError(RuntimeError):
    """A modality's decode or preprocess fails on every sample it is given: a bug, not bad data."""


class Refused(ValueError):
    """A value refused before decoding it would cost what the sample's budget allows (an image whose
    header claims too many pixels, audio too long to read whole): a bad sample, counted under
    `refused/<modality>/<kind>` besides `bad/<modality>`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Modality(ABC):
    """Base class of every modality. Subclasses are dataclasses whose fields are their config, and
    implement the four abstract methods."""

    name: ClassVar[str]
    # WebDataset keys (file extensions inside a sample) that hold this modality, in order of preference.
    extensions: ClassVar[tuple[str, ...]]
    # Tower keys that may start fresh when its weights come from another model (a new head).
    fresh_keys: ClassVar[tuple[str, ...]] = ()
    # True: `decode` also takes a large member of a local shard unread (a contrastive.data.tar.Span,
    # whose `open()` reads it as a file), for a decoder that needs only part of it
    reads_spans: ClassVar[bool] = False

    @abstractmethod
    def decode(self, data: bytes, extension: str) -> Any:
        """Bytes of one shard member -> a decoded value. Raises on corrupt or unusable input."""

    def load(self, item: Any) -> Any:
        """A user's value (a file path, bytes or an already decoded object) -> a decoded value."""
        if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
            if isinstance(item, bytes):
                return self.decode(item, self.extensions[0])
            path = str(item)
            with open(path, "rb") as f:
                return self.decode(f.read(), path.rsplit(".", 1)[-1].lower())
        return item

    def views(self, value: Any) -> list[Any]:
        """Several views of one value whose embeddings are averaged in evaluation and `embed` (the
        windows of a long audio clip); training uses one."""
        return [value]

    def alternatives(self, value: Any) -> list[Any]:
        """The values one decoded value holds when it holds several (the captions of one image, one a
        line): in evaluation each is a retrieval entry of its own; training uses the value whole."""
        return [value]

    @abstractmethod
    def preprocess(self, value: Any, *, train: bool) -> torch.Tensor:
        """Decoded value -> the model input of one sample (train=True applies augmentation)."""

    @abstractmethod
    def empty(self) -> torch.Tensor:
        """Input for a row that lacks this modality; its embedding is masked out of every loss."""

    def on_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch of `preprocess`'s outputs, on the model's device, as the tower takes it: the last
        arithmetic of preprocessing may be left to here, so that what travels from the loader to
        the device is small (images as bytes, normalised on the GPU)."""
        return inputs

    @abstractmethod
    def build_encoder(self, embed_dim: int) -> nn.Module:
        """The tower: a batch of inputs -> [batch, embed_dim] (before L2 normalisation)."""

    def from_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """This modality's tower weights from another model's checkpoint, its layout mapped (open_clip's
        for images and text, AST's for audio...); None when the modality maps none."""
        return None

    def pretrained_weights(self) -> dict[str, torch.Tensor] | None:
        """The tower's released weights its fields name (an open_clip tag), loaded before training."""
        return None

    def config(self) -> dict[str, Any]:
        """The fields that rebuild this modality (stored in checkpoints and exports)."""
        return dataclasses.asdict(self)


def register_modality(name: str):
    """Class decorator: registers a `Modality` dataclass under `name`."""

    def register(cls: type[Modality]) -> type[Modality]:
        if not (isinstance(cls, type) and issubclass(cls, Modality)):
            raise TypeError(f"@register_modality({name!r}) needs a Modality subclass, got {cls!r}")
        cls.name = name
        MODALITIES[name] = cls
        return cls

    return register


def build_modality(name: str, **kwargs: Any) -> Modality:
    """An instance of the registered modality `name`, with a clear error for unknown names or keys."""
    if name not in MODALITIES:
        raise ConfigError(
            f"unknown modality {name!r}; registered: {sorted(MODALITIES)}. "
            "A modality defined in your own module is registered by importing it: imports=[your.module]"
        )
    cls = MODALITIES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"modality.{name}: unknown key(s) {unknown}; {cls.__name__} takes {sorted(known)}")
    return cls(**kwargs)
