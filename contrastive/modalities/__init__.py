"""Modalities, one file each, in a registry keyed by name (see base.py for the contract)."""

# Importing the built-in modalities registers them.
from contrastive.modalities import audio, image, text  # noqa: E402,F401
from contrastive.modalities.base import (
    MODALITIES,
    ConfigError,
    Modality,
    ModalityError,
    build_modality,
    register_modality,
)

__all__ = ["MODALITIES", "ConfigError", "Modality", "ModalityError", "build_modality", "register_modality"]
