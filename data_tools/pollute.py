"""`contrastive-data pollute`: known problems planted into a clean set, to measure curation."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

from contrastive.data.sources import iter_tar_samples
from contrastive.data.storage import redact
from contrastive.data_tools.curate import (
    REPORT,
    caption_of,
    content_of,
    prepare_output,
    save_figure,
    source_shards,
)
from contrastive.modalities import MODALITIES


def nudge_image(content: bytes) -> bytes:
    """The same picture, not the same bytes: 4% brighter, re-encoded in its format."""
    from PIL import Image, ImageEnhance

    img = Image.open(io.BytesIO(content))
    fmt = img.format or "PNG"
    buf = io.BytesIO()
    ImageEnhance.Brightness(img.convert("RGB")).enhance(1.04).save(buf, format=fmt)
    return buf.getvalue()


def pollute(
    src: str,
    dst: str | Path,
    *,
    against: str | None = None,
    mismatch: float = 0.2,
    duplicates: float = 0.05,
    near_duplicates: float = 0.05,
    leaks: int = 20,
    shard_size: int = 400,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A copy of `src` with planted problems, listed in DST/planted.json: captions swapped for another
    label's (`mismatch` of the captioned samples), exact copies and near copies (the image nudged) of
    other samples, and `leaks` samples of the `against` set. Needs a `json` label on each sample."""
    from contrastive.data.shards import ShardWriter

    rng = random.Random(seed)
    shards = source_shards(src)
    samples = [s for shard in shards for s in iter_tar_samples(shard.path)]
    out = prepare_output(src, dst, overwrite=overwrite)
    label = [json.loads(s["json"])["label"] if "json" in s else None for s in samples]
    captioned = [i for i, s in enumerate(samples) if caption_of(s) is not None and label[i] is not None]
    swapped = set(rng.sample(captioned, int(mismatch * len(captioned))))
    planted: dict[str, Any] = {"mismatched": [], "duplicates": {}, "near_duplicates": {}, "leaks": {}}
    originals = [dict(s) for s in samples]
    for i in sorted(swapped):
        other = rng.choice([j for j in captioned if label[j] != label[i]])
        samples[i]["txt"] = originals[other]["txt"]
        planted["mismatched"].append(samples[i]["__key__"])
    clean = [i for i in range(len(samples)) if i not in swapped and content_of(samples[i], "image") is not None]
    extra = []
    chosen = rng.sample(clean, int(duplicates * len(samples)) + int(near_duplicates * len(samples)))
    exact, near = chosen[: int(duplicates * len(samples))], chosen[int(duplicates * len(samples)) :]
    for i in exact:
        copy = dict(samples[i], __key__=f"{samples[i]['__key__']}_copy")
        planted["duplicates"][copy["__key__"]] = samples[i]["__key__"]
        extra.append(copy)
    for i in near:
        copy = dict(samples[i], __key__=f"{samples[i]['__key__']}_near")
        for ext in MODALITIES["image"].extensions:
            if ext in copy:
                copy[ext] = nudge_image(copy[ext])
        planted["near_duplicates"][copy["__key__"]] = samples[i]["__key__"]
        extra.append(copy)
    if against and leaks:
        theirs = [s for shard in source_shards(against) for s in iter_tar_samples(shard.path)]
        for s in rng.sample(theirs, min(leaks, len(theirs))):
            copy = dict(s, __key__=f"leak_{s['__key__']}")
            planted["leaks"][copy["__key__"]] = s["__key__"]
            extra.append(copy)
    for copy in extra:
        samples.insert(rng.randrange(len(samples) + 1), copy)
    with ShardWriter(out, prefix="polluted", max_count=shard_size) as writer:
        writer.write_all(samples)
    planted["samples"] = len(samples)
    (out / "planted.json").write_text(json.dumps(planted, indent=1, sort_keys=True) + "\n")
    (out / REPORT).write_text(json.dumps({"command": "pollute", "source": redact(src)}, indent=1) + "\n")
    plot_planted(planted, out / "pollute.png")
    return planted


def plot_planted(planted: dict[str, Any], path: Path) -> None:
    """How many of each problem were planted, among how many samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["mismatched", "duplicates", "near_duplicates", "leaks"]
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.barh(kinds, [len(planted[k]) for k in kinds], color="#c0392b")
    ax.set_title(f"planted among {planted['samples']} samples")
    ax.invert_yaxis()
    save_figure(fig, path)
