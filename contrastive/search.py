"""Search indexes over `contrastive-embed embed` output, and the samples' media fetched back from
their shards.

    IDX/
      index.json            the model, the data, per modality: rows, index kind and parameters
      <modality>.faiss      a faiss index of that modality's unit embeddings (inner product = cosine)
      <modality>.rows.json  row -> sample number (into samples.json)
      samples.json          shards (locations) and per sample: key, shard, label, caption, and each
                            member's (offset, size) in its shard, so media are read back directly

The index kind follows the count, as autofaiss chooses: exact (`Flat`) up to `exact_below` rows,
above that an inverted file (`IVF<lists>,Flat`, lists ~ 4 sqrt(n), trained on a sample) searched
with `nprobe` = lists / 16 (a sixteenth of the rows scanned a query; benchmarks/index.py measures
the recall and latency this buys). Indexes are memory-mapped when read (faiss's IO_FLAG_MMAP), so one larger than
RAM is served from the page cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from contrastive.data.shards import list_shards, sample_key
from contrastive.data.storage import is_remote, redact
from contrastive.embed import load_embeddings

log = logging.getLogger("contrastive.search")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # not which CPU build it tried first

EXACT_BELOW = 100_000
MEDIA_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "txt": "text/plain; charset=utf-8",
}


def index_kind(n: int, exact_below: int = EXACT_BELOW) -> tuple[str, dict[str, int]]:
    """(faiss factory string, search parameters) for `n` vectors."""
    if n <= exact_below:
        return "Flat", {}
    lists = 1 << max(4, round(math.log2(4 * math.sqrt(n))))
    return f"IVF{lists},Flat", {"nprobe": max(16, lists // 16), "train": min(n, 64 * lists)}


def build_vectors_index(vectors: np.ndarray, exact_below: int = EXACT_BELOW, seed: int = 0):
    """A faiss index over unit `vectors` (inner product), and (its kind, its search parameters)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    kind, params = index_kind(len(x), exact_below)
    index = faiss.index_factory(x.shape[1], kind, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(x[np.sort(rng.choice(len(x), params["train"], replace=False))])
    index.add(x)
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    return index, kind, params


def member_table(location: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """A shard's samples in order: key -> {ext: (offset, size)}, with their text and label read."""
    samples: dict[str, dict[str, Any]] = {}
    with open_shard(location) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = sample_key(member.name)
            if key is None:
                continue
            entry = samples.setdefault(key, {"members": {}})
            entry["members"][ext] = (member.offset_data, member.size)
            if ext in ("txt", "json") and member.size <= 1 << 16:
                data = tar.extractfile(member).read()
                if ext == "txt":
                    entry["caption"] = data.decode("utf-8", errors="replace")
                else:
                    try:
                        entry["label"] = json.loads(data).get("label")
                    except (ValueError, AttributeError):
                        pass
    return samples, list(samples)


def build_index(emb_dir: str | os.PathLike, out_dir: str | os.PathLike, *, exact_below: int = EXACT_BELOW) -> dict:
    """Builds IDX (see the module docstring) from `contrastive-embed embed`'s output; returns index.json."""
    import faiss

    emb, out = Path(emb_dir), Path(out_dir)
    made = json.loads((emb / "embed.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    shards = list_shards(made["data"], count=False)
    table: list[dict[str, Any]] = []
    number: dict[str, int] = {}
    for i, shard in enumerate(shards):
        samples, order = member_table(shard.path)
        for key in order:
            number[key] = len(table)
            table.append({"key": key, "shard": i, **samples[key]})
    info: dict[str, Any] = {"model": made["model"], "data": redact(made["data"]), "modalities": {}}
    for modality in made["modalities"]:
        vectors, keys, _ = load_embeddings(emb, modality)
        missing = [k for k in keys if k not in number]
        if missing:
            raise ValueError(f"{len(missing)} embedded {modality} samples are not in the shards (first: {missing[0]})")
        index, kind, params = build_vectors_index(vectors, exact_below)
        faiss.write_index(index, str(out / f"{modality}.faiss"))
        (out / f"{modality}.rows.json").write_text(json.dumps([number[k] for k in keys]))
        info["modalities"][modality] = {"rows": len(keys), "kind": kind, **params}
        log.debug("%s: %d rows, %s", modality, len(keys), kind)  # the command prints it
    # local shards by absolute path: the index is served from anywhere
    located = [s.path if "://" in s.path or s.path.startswith("pipe:") else os.path.abspath(s.path) for s in shards]
    (out / "samples.json").write_text(json.dumps({"shards": located, "samples": table}))
    (out / "index.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


@dataclass
class Hit:
    key: str
    score: float
    label: Any
    caption: str | None
    media: list[str]  # the modalities the sample holds


class SearchIndex:
    """IDX read back: search per modality, a sample's media by key."""

    def __init__(self, directory: str | os.PathLike):
        import faiss

        self.directory = Path(directory)
        self.info = json.loads((self.directory / "index.json").read_text())
        table = json.loads((self.directory / "samples.json").read_text())
        self.shards: list[str] = table["shards"]
        self.samples: list[dict[str, Any]] = table["samples"]
        self.by_key = {s["key"]: i for i, s in enumerate(self.samples)}
        self.indexes, self.rows = {}, {}
        for modality, meta in self.info["modalities"].items():
            index = faiss.read_index(str(self.directory / f"{modality}.faiss"), faiss.IO_FLAG_MMAP)
            if "nprobe" in meta:
                faiss.extract_index_ivf(index).nprobe = meta["nprobe"]
            self.indexes[modality] = index
            self.rows[modality] = json.loads((self.directory / f"{modality}.rows.json").read_text())

    @property
    def modalities(self) -> list[str]:
        return list(self.indexes)

    def search(self, modality: str, query: np.ndarray, k: int) -> list[Hit]:
        scores, ids = self.indexes[modality].search(np.ascontiguousarray(query[None], dtype=np.float32), k)
        hits = []
        for score, row in zip(scores[0], ids[0]):
            if row < 0:
                continue
            sample = self.samples[self.rows[modality][row]]
            hits.append(
                Hit(
                    key=sample["key"],
                    score=float(score),
                    label=sample.get("label"),
                    caption=sample.get("caption"),
                    media=sorted(sample["members"]),
                )
            )
        return hits

    def member(self, key: str, extensions: Sequence[str]) -> tuple[str, bytes] | None:
        """(extension, bytes) of the sample's first member among `extensions`, read from its shard at
        its offset (a local file, or a ranged read of a remote one); None if it has none."""
        sample = self.samples[self.by_key[key]]
        for ext in extensions:
            if ext in sample["members"]:
                offset, size = sample["members"][ext]
                return ext, read_range(self.shards[sample["shard"]], offset, size)
        return None


def open_shard(location: str):
    """A seekable binary file of a shard: local, or remote through fsspec (ranged reads)."""
    if not is_remote(location):
        return open(location, "rb")
    from contrastive.data.storage import filesystem

    fs, path = filesystem(location)
    return fs.open(path, "rb")


def read_range(location: str, offset: int, size: int) -> bytes:
    with open_shard(location) as f:
        f.seek(offset)
        return f.read(size)
