"""Evaluation sets in CLIP_benchmark's WebDataset layout, from a manifest, so that a set scores the
same in `contrastive-eval` and in CLIP_benchmark:

    contrastive-data benchmark OUT --manifest esc50.csv --task classification --templates sound.txt
    contrastive-data benchmark OUT --manifest coco.csv --task retrieval         # rows grouped by `group`

    OUT/
      test/0.tar 1.tar ... nshards.txt     samples: the media, `cls` (classification) or `txt`, one
                                           caption a line (retrieval), `json` ({"label": name})
      classnames.txt                       one class a line, in `cls` order (classification)
      zeroshot_classification_templates.txt   one template a line, `{c}` for the class name
      dataset_type.txt                     classification | retrieval

Manifest columns as `contrastive-data shards` reads them (key, image, audio, text, text_path, label,
group). Classification: `label` names each row's class; the class order is `--classnames`' or the
sorted labels'. Retrieval: rows sharing a `group` are one item: its media from the group's first row,
its captions from every row's text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from contrastive.data.shards import SIZES_FILE, write_shard
from contrastive.data_tools.shards import Item, items_from_manifest

TASKS = ("classification", "retrieval")
# `--templates openai-imagenet`: CLIP's 80 ImageNet templates, as open_clip ships them
NAMED_TEMPLATES = {"openai-imagenet": "OPENAI_IMAGENET_TEMPLATES", "simple-imagenet": "SIMPLE_IMAGENET_TEMPLATES"}


def read_templates(spec: str | None) -> list[str]:
    """A file of templates (one a line, `{c}`), a named list (openai-imagenet), or the plain class name."""
    if spec is None:
        return ["{c}"]
    if spec in NAMED_TEMPLATES:
        from open_clip import zero_shot_metadata

        return [t("{c}") for t in getattr(zero_shot_metadata, NAMED_TEMPLATES[spec])]
    lines = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--templates {spec}: no template in it")
    return lines


def _media(item: Item) -> dict[str, bytes]:
    return {ext: path.read_bytes() for ext, path in item.files.items() if ext != "txt"}


def _captions(item: Item) -> list[str]:
    text = item.text if item.text is not None else (item.files["txt"].read_text() if "txt" in item.files else "")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_benchmark_set(
    out_dir: str | os.PathLike,
    *,
    manifest: str,
    task: str,
    classnames: str | None = None,
    templates: str | None = None,
    split: str = "test",
    max_count: int = 1000,
) -> dict[str, Any]:
    """Writes the set; returns {"samples": n, "shards": n, "classes": n} or raises ValueError."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {TASKS}")
    items, problems = items_from_manifest(Path(manifest))
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in {manifest}:\n  " + "\n  ".join(problems[:20]))
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    names: list[str] = []
    if task == "classification":
        labels = [item.meta.get("label") for item in items]
        if any(label is None for label in labels):
            raise ValueError("classification: every row needs a label (its class name)")
        names = (
            [line.strip() for line in Path(classnames).read_text().splitlines() if line.strip()]
            if classnames
            else sorted(set(labels))
        )
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown[:10]} are not among the class names of {classnames}")
        for item, label in zip(items, labels):
            samples.append({"__key__": item.key, **_media(item), "cls": str(index[label]), "json": {"label": label}})
        (out / "classnames.txt").write_text("\n".join(names) + "\n")
        (out / "zeroshot_classification_templates.txt").write_text("\n".join(read_templates(templates)) + "\n")
    else:
        groups: dict[str, list[Item]] = {}
        for item in items:
            groups.setdefault(item.meta.get("group", item.key), []).append(item)
        for group, members in groups.items():
            captions = [c for member in members for c in _captions(member)]
            if not captions:
                raise ValueError(f"retrieval: item {group!r} has no caption")
            first = members[0]
            meta = {k: v for k, v in first.meta.items() if k == "label"}
            samples.append(
                {"__key__": first.key, **_media(first), "txt": "\n".join(captions), **({"json": meta} if meta else {})}
            )
    shards = [samples[i : i + max_count] for i in range(0, len(samples), max_count)]
    sizes = {}
    for i, shard in enumerate(shards):
        sizes[f"{i}.tar"] = write_shard(out / split / f"{i}.tar", shard)
    (out / split / "nshards.txt").write_text(f"{len(shards)}\n")
    (out / split / SIZES_FILE).write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    (out / "dataset_type.txt").write_text(task + "\n")
    return {"samples": len(samples), "shards": len(shards), "classes": len(names)}
