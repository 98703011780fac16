"""Modalities, one file each, in a registry keyed by name (see base.py for the contract)."""

from contrastive.modalities.base import (
    MODALITIES,
    ConfigError,
    Modality,
    build_modality,
    register_modality,
)

# Importing the built-in modalities registers them.
from contrastive.modalities import audio, image, text  # noqa: E402,F401

__all__ = ["MODALITIES", "ConfigError", "Modality", "build_modality", "register_modality"]
