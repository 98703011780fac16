"""The GPU check's synthetic shards: smooth colour fields as JPEG with captions, and (tri-modal) tones
as FLAC, written by a process pool; made on the lent machine itself, since nothing is carried there
but wheels."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path


def _sample(args: tuple[int, int, float, bool]) -> dict:
    """One synthetic sample: a smooth colour field as JPEG, a caption, and (tri-modal) a tone as FLAC."""
    import io

    import numpy as np
    import soundfile
    from PIL import Image

    i, size, seconds, audio = args
    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    jpg = io.BytesIO()
    small.save(jpg, format="JPEG", quality=90)
    sample = {"__key__": f"s{i:07d}", "jpg": jpg.getvalue(), "txt": f"a photo of pattern {i % 97} in colour {i % 13}"}
    if audio:
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 20 * (i % 50)) * t) + 0.01 * rng.normal(size=t.size)
        flac = io.BytesIO()
        soundfile.write(flac, wave.astype(np.float32), 16000, format="FLAC")
        sample["flac"] = flac.getvalue()
    return sample


def shards_stage(s: dict, work: Path, kinds: tuple[str, ...] = ("image_text", "trimodal")) -> dict:
    from contrastive.data.shards import ShardWriter

    out = {}
    for name, audio in (("image_text", False), ("trimodal", True)):
        if name not in kinds:
            continue
        folder = work / name
        jobs = [(i, s["image_size"], s["audio_seconds"], audio) for i in range(s["samples"])]
        with multiprocessing.get_context("fork").Pool(min(16, os.cpu_count() or 1)) as pool:
            samples = pool.map(_sample, jobs, chunksize=64)
        with ShardWriter(folder, prefix="it", max_count=max(s["samples"] // 16, 1)) as writer:
            writer.write_all(samples)
        out[name] = {"path": str(folder), "samples": len(samples), "shards": len(list(folder.glob("*.tar")))}
    return out
