"""The modality registry: built-ins, building with checked keys, clear errors."""

import pytest

from contrastive.modalities import MODALITIES, ConfigError, build_modality
from contrastive.modalities.audio import Audio
from contrastive.modalities.image import Image
from contrastive.modalities.text import Text


def test_builtin_modalities_are_registered():
    assert MODALITIES["image"] is Image
    assert MODALITIES["audio"] is Audio
    assert MODALITIES["text"] is Text


def test_build_modality_passes_fields():
    image = build_modality("image", image_size=32, patch_size=8, width=64, layers=2)
    assert (image.image_size, image.patch_size, image.width, image.layers) == (32, 8, 64, 2)
    assert image.config()["image_size"] == 32


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"modality\.image: unknown key\(s\) \['widht'\]"):
        build_modality("image", widht=64)


def test_unknown_modality_is_named():
    with pytest.raises(ConfigError, match="unknown modality 'depth'"):
        build_modality("depth")


def test_register_rejects_non_modality():
    from contrastive.modalities import register_modality

    with pytest.raises(TypeError):
        register_modality("bogus")(object)
    assert "bogus" not in MODALITIES
