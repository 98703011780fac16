"""Build shards in the documented format from a manifest or from a folder of files paired by stem.

    contrastive-data shards OUT --manifest pairs.csv       # columns: key,image,audio,text,text_path,label
    contrastive-data shards OUT --manifest pairs.jsonl
    contrastive-data shards OUT --folder raw/              # dog.jpg + dog.flac + dog.txt -> one sample

Items are planned first (sorted folder keys, or manifest order), cut into shards by sample count and
bytes, and written by parallel worker processes, one shard each; `sizes.json` is written last. The
same input gives byte-identical output whatever the number of workers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrastive.data.shards import SIZES_FILE, write_shard
from contrastive.modalities import MODALITIES

log = logging.getLogger(__name__)

COLUMNS = ("key", "image", "audio", "text", "text_path", "label", "group")


@dataclass
class Item:
    key: str
    files: dict[str, Path] = field(default_factory=dict)  # extension -> file
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values()) + len((self.text or "").encode())


def extension_kinds() -> dict[str, str]:
    """Extension -> modality name, for every registered modality, plus json metadata. Where two
    modalities read one extension (a variant of a built-in one), the first registered names it."""
    kinds = {"json": "json"}
    for name, cls in MODALITIES.items():
        for ext in cls.extensions:
            kinds.setdefault(ext, name)
    return kinds


def clean_key(raw: str) -> str:
    """A sample key: no dots (the key ends at the first dot of a member name), no path separators."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", raw)


def items_from_folder(folder: Path) -> tuple[list[Item], list[str]]:
    kinds = extension_kinds()
    items: dict[str, Item] = {}
    skipped = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        if ext not in kinds:
            skipped.append(str(path))
            continue
        stem = str(path.relative_to(folder).with_suffix(""))
        item = items.setdefault(stem, Item(clean_key(stem)))
        if kinds[ext] == "json":
            item.meta.update(json.loads(path.read_text()))
        elif any(kinds.get(e) == kinds[ext] for e in item.files):
            skipped.append(f"{path} (a second {kinds[ext]} for {stem})")
        else:
            item.files[ext] = path
    return list(items.values()), skipped


def read_manifest(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]


def items_from_manifest(path: Path) -> tuple[list[Item], list[str]]:
    base = path.parent
    kinds = extension_kinds()
    items, problems = [], []
    width = 8
    for i, row in enumerate(read_manifest(path)):
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            problems.append(f"row {i + 1}: unknown column(s) {unknown} (known: {list(COLUMNS)})")
            continue
        item = Item(clean_key(str(row.get("key", f"{i:0{width}d}"))))
        for column in ("image", "audio", "text_path"):
            if column in row:
                file = base / row[column]
                ext = "txt" if column == "text_path" else file.suffix.lower().lstrip(".")
                expected = "text" if column == "text_path" else column
                if kinds.get(ext) != expected:
                    problems.append(f"row {i + 1}: {column} {file} has no {expected} extension")
                elif not file.is_file():
                    problems.append(f"row {i + 1}: {column} {file} does not exist")
                else:
                    item.files[ext] = file
        if "text" in row:
            item.text = str(row["text"])
        for column in ("label", "group"):  # json metadata: the class name; the item several samples share
            if column in row:
                item.meta[column] = str(row[column])
        items.append(item)
    return items, problems


def plan_shards(items: list[Item], *, max_count: int, max_bytes: int) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        n = item.nbytes()
        if shards[-1] and (len(shards[-1]) >= max_count or size + n > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return [s for s in shards if s]


def _write(job: tuple[Path, list[Item]]) -> int:
    path, items = job
    samples = []
    for item in items:
        sample: dict[str, Any] = {"__key__": item.key}
        for ext, file in item.files.items():
            sample[ext] = file.read_bytes()
        if item.text is not None:
            sample["txt"] = item.text
        if item.meta:
            sample["json"] = item.meta
        samples.append(sample)
    write_shard(path, samples)
    return len(samples)


def build_shards(
    out_dir: str | os.PathLike,
    *,
    manifest: str | None = None,
    folder: str | None = None,
    prefix: str = "part",
    max_count: int = 1000,
    max_bytes: int = 1 << 30,
    workers: int = 4,
) -> dict[str, Any]:
    """Plans and writes the shards; returns {"sizes": ..., "skipped": [...]} or raises ValueError."""
    if (manifest is None) == (folder is None):
        raise ValueError("give exactly one of --manifest and --folder")
    items, problems = items_from_manifest(Path(manifest)) if manifest else items_from_folder(Path(folder))
    if manifest and problems:
        raise ValueError(f"{len(problems)} problem(s) in {manifest}:\n  " + "\n  ".join(problems[:20]))
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:10]
        raise ValueError(f"duplicate sample keys {dupes}: give each row a distinct key")
    empty = [it.key for it in items if not it.files and it.text is None]
    if empty:
        raise ValueError(f"{len(empty)} item(s) hold no modality, e.g. {empty[:5]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(items, max_count=max_count, max_bytes=max_bytes)
    jobs = [(out / f"{prefix}-{i:06d}.tar", shard) for i, shard in enumerate(plan)]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        counts = list(pool.map(_write, jobs))
    sizes = {path.name: n for (path, _), n in zip(jobs, counts)}
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    return {"sizes": sizes, "skipped": problems}
