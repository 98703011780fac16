"""Small synthetic datasets in the shard format, written as real tar shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from contrastive.data.shards import ShardWriter
from contrastive.modalities import build_modality

TINY = {
    "image": dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    "audio": dict(clip_seconds=0.5, n_mels=32, patch_size=16, width=64, layers=2, heads=2),
    "text": dict(context_length=16, width=64, layers=2, heads=2),
}


def tiny_modalities(names=("image", "audio", "text")):
    mods = {n: build_modality(n, **TINY[n]) for n in names}
    if "text" in mods:  # its tokenizer imports open_clip (seconds): once here, not in each forked loader worker
        assert mods["text"].tokenizer is not None
    return mods


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def flac(seed: int, seconds: float = 0.3, rate: int = 16000) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    soundfile.write(buf, (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def sample(i: int, *, image=True, audio=True, text=True, label=True) -> dict:
    s = {"__key__": f"s{i:05d}"}
    if image:
        s["png"] = png(i)
    if audio:
        s["flac"] = flac(i)
    if text:
        s["txt"] = f"sample number {i}"
    if label:
        s["json"] = {"label": f"class{i % 3}"}
    return s


def write_dataset(out: Path, samples: list[dict], shard_size: int = 10) -> Path:
    with ShardWriter(out, prefix="part", max_count=shard_size) as writer:
        writer.write_all(samples)
    return out
