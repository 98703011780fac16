"""contrastive: CLIP/ImageBind-style contrastive pretraining of image, audio, text and more.

import contrastive
model = contrastive.load_pretrained("runs/.../export")
text = model.embed("text", ["the digit seven"])
audio = model.embed("audio", ["seven.flac"])
"""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """An exported directory -> a ContrastiveModel that embeds raw inputs (see contrastive.export)."""
    from contrastive.export import load_pretrained as _load

    return _load(path, device=device)


__all__ = ["load_pretrained", "__version__"]
