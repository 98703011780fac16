"""`contrastive-data dedup`: exact copies by hash and near copies by embedding, within a set and
against evaluation sets (see contrastive/data_tools/curate.py).

Within a set, a copy is a copy of a whole pair: a sample is a duplicate of an earlier one when its
judged modality (`--modality`, the image by default) is the same bytes (exact) or embeds within the
threshold (near) AND every other member it holds (its caption, its clip, its metadata) is the same
bytes. An image that appears with two different clips, or two captions, makes two pairs, not a
copy. Against an evaluation set the judged modality alone decides: an evaluation image seen in
training is a leak whatever it is paired with.

The near-copy threshold (`DEFAULT_THRESHOLD`, 0.999) is on the cosine of the judged modality's
embeddings. It belongs to the model: a model that tells little apart (the demo's, trained to tell
ten digits) puts every pair of one class above 0.95, which would call most of a set copies.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from contrastive.data.shards import DataError
from contrastive.data.sources import iter_tar_samples
from contrastive.data.storage import redact
from contrastive.data_tools.curate import (
    content_of,
    embed_set,
    finish_output,
    load_model,
    map_shards,
    pool,
    prepare_output,
    save_figure,
    shard_embeddings,
    source_shards,
    write_without,
)
from contrastive.modalities import MODALITIES

EXACT_INDEX_LIMIT = 100_000  # above this many vectors, search an IVF index instead of all pairs
DEFAULT_THRESHOLD = 0.999  # near copies: the judged modality's cosine (see the module docstring)


def _hash_shard(location: str, modality: str) -> tuple[list[tuple[str, str, str]], str | None]:
    rows, error = [], None
    extensions = set(MODALITIES[modality].extensions)
    try:
        for sample in iter_tar_samples(location):
            content = content_of(sample, modality)
            if content is not None:
                rest = hashlib.sha256()
                for ext in sorted(e for e in sample if not e.startswith("__") and e not in extensions):
                    rest.update(ext.encode() + b"\0" + hashlib.sha256(sample[ext]).digest())
                rows.append((sample["__key__"], hashlib.sha256(content).hexdigest(), rest.hexdigest()))
    except Exception as e:
        error = f"{type(e).__name__}: {redact(str(e))}"
    return rows, error


def hashes(p: ProcessPoolExecutor, src: str, modality: str) -> list[tuple[str, str, str, str]]:
    """[(shard, key, sha256 of the modality's bytes, sha256 of the sample's other members)] in the
    set's order."""
    shards = source_shards(src)
    found = map_shards(p, partial(_hash_shard, modality=modality), shards, f"hashing {redact(src)}")
    return [(s.name, *row) for s, (rows, _) in zip(shards, found) for row in rows]


def finding(key: str, shard: str, of: str, kind: str, score: float, in_set: str | None = None) -> dict[str, Any]:
    """One duplicate (or, with `in_set`, one leak): the sample, its shard, the sample it copies."""
    out = {"key": key, "shard": shard, "of": of, "kind": kind, "score": round(float(score), 6)}
    return out | ({"set": redact(in_set)} if in_set is not None else {})


def neighbours(index_vectors: np.ndarray, queries: np.ndarray, threshold: float):
    """faiss range search: (lims, scores, ids) of every index vector with cosine >= threshold, exact
    up to EXACT_INDEX_LIMIT vectors, an IVF index (nprobe 16) above."""
    return vector_index(index_vectors).range_search(np.ascontiguousarray(queries, dtype=np.float32), float(threshold))


def nearest_other(vectors: np.ndarray) -> np.ndarray:
    """Each vector's cosine to its nearest other vector of the set."""
    scores, _ = vector_index(vectors).search(np.ascontiguousarray(vectors, dtype=np.float32), 2)
    return scores[:, 1]


def vector_index(index_vectors: np.ndarray):
    """A faiss inner-product index of the vectors: exact up to EXACT_INDEX_LIMIT, IVF (nprobe 16) above."""
    import faiss

    x = np.ascontiguousarray(index_vectors, dtype=np.float32)
    d = x.shape[1]
    if len(x) <= EXACT_INDEX_LIMIT:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(4 * math.sqrt(len(x)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(len(x), min(len(x), 64 * lists), replace=False)])
        index.nprobe = 16
    index.add(x)
    return index


def dedup(
    src: str,
    *,
    against: Sequence[str] = (),
    model: str | None = None,
    modality: str = "image",
    threshold: float | None = None,
    out: str | Path | None = None,
    work: str | Path | None = None,
    workers: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Duplicates within `src` (a later sample matching an earlier one is the duplicate) and leaks of
    `against` sets into it, by `modality` (see the module docstring): exact copies by the hash of its
    bytes, then, with a model, near copies by the cosine of their embeddings >= `threshold` (None:
    DEFAULT_THRESHOLD). The
    report lists each with the sample it copies; with `out`, a copy of `src` without them. Scratch
    (the embeddings) goes to `work`, else a temporary directory: never into the output set."""
    if modality not in MODALITIES:
        raise DataError(f"--modality {modality!r}: one of {sorted(MODALITIES)}")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if out is not None:
        prepare_output(src, out, overwrite=overwrite)
    loader = (load_model, (model,)) if model else (None, ())
    with pool(workers, *loader) as p, tempfile.TemporaryDirectory(prefix="dedup-work-") as tmp:
        return find_copies(p, src, against, model, modality, threshold, out, Path(work or tmp))


def find_copies(p, src, against, model, modality, threshold, out, work) -> dict[str, Any]:
    rows = hashes(p, src, modality)
    first: dict[tuple[str, str], str] = {}
    found: dict[str, dict[str, Any]] = {}  # key -> finding
    for shard, key, digest, rest in rows:  # an exact copy: the judged modality and every other member
        if (digest, rest) in first:
            found[key] = finding(key, shard, first[digest, rest], "exact", 1.0)
        else:
            first[digest, rest] = key
    leaks: dict[str, dict[str, Any]] = {}
    for name in against:
        theirs = {digest: key for _, key, digest, _ in hashes(p, name, modality)}
        for shard, key, digest, _ in rows:
            if digest in theirs and key not in leaks:
                leaks[key] = finding(key, shard, theirs[digest], "exact", 1.0, name)
    nearest: list[float] = []
    if model is not None:
        partners = {key: rest for _, key, _, rest in rows}
        nearest = near_duplicates(p, src, against, model, modality, threshold, work, found, leaks, partners)
    report = {
        "source": redact(src),
        "modality": modality,
        "model": model,
        "threshold": threshold if model else None,
        "against": [redact(a) for a in against],
        "samples": len(rows),
        "duplicates": sorted(found.values(), key=lambda f: (f["shard"], f["key"])),
        "leaks": sorted(leaks.values(), key=lambda f: (f["shard"], f["key"])),
        "counts": dict(Counter(f"duplicates/{f['kind']}" for f in found.values()))
        | dict(Counter(f"leaks/{f['kind']}" for f in leaks.values())),
    }
    if out is None:
        return report
    drop: dict[str, set[str]] = {}
    for f in [*found.values(), *leaks.values()]:
        drop.setdefault(f["shard"], set()).add(f["key"])
    shards = source_shards(src)
    written = write_without(p, shards, Path(out), drop)
    plot_dedup(report, nearest, threshold if model else None, Path(out) / "dedup.png")
    return finish_output(Path(out), "dedup", written, report)


def near_duplicates(p, src, against, model, modality, threshold, work, found, leaks, partners) -> list[float]:
    """Adds the near copies (embedding cosine >= threshold, the other members the same bytes) to
    `found` and `leaks`; returns each sample's cosine to its nearest other sample (for the plot)."""
    shards = embed_set(p, model, [modality], src, work / "source")
    parts = [(s.name, *shard_embeddings(work / "source", s, modality)) for s in shards]
    vectors = np.concatenate([x for _, x, _ in parts]) if parts else np.zeros((0, 1), np.float32)
    where = [(shard, key) for shard, _, keys in parts for key in keys]
    nearest: list[float] = []
    if len(vectors):
        nearest = nearest_other(vectors).tolist() if len(vectors) > 1 else []
        lims, scores, ids = neighbours(vectors, vectors, threshold)
        for i, (shard, key) in enumerate(where):
            earlier = [(j, s) for j, s in zip(ids[lims[i] : lims[i + 1]], scores[lims[i] : lims[i + 1]]) if j < i]
            same = [(j, s) for j, s in earlier if partners.get(where[j][1]) == partners.get(key)]
            if same and key not in found:
                j, s = max(same, key=lambda hit: (hit[1], -hit[0]))  # the closest earlier sample
                found[key] = finding(key, shard, where[j][1], "near", s)
    for n, name in enumerate(against):
        theirs = embed_set(p, model, [modality], name, work / f"against-{n}")
        their = [shard_embeddings(work / f"against-{n}", s, modality) for s in theirs]
        their_vectors = np.concatenate([x for x, _ in their]) if their else np.zeros((0, 1), np.float32)
        their_keys = [k for _, keys in their for k in keys]
        if not len(their_vectors) or not len(vectors):
            continue
        lims, scores, ids = neighbours(their_vectors, vectors, threshold)
        for i, (shard, key) in enumerate(where):
            hits = list(zip(scores[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]]))
            if hits and key not in leaks:
                s, j = max(hits, key=lambda h: (h[0], -h[1]))
                leaks[key] = finding(key, shard, their_keys[j], "near", s, name)
    return nearest


def plot_dedup(report: dict[str, Any], nearest: list[float], threshold: float | None, path: Path) -> None:
    """What dedup found, by kind; with a model, each sample's cosine to its nearest other sample
    (from 0.9) against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if threshold is not None else 1, figsize=(9 if threshold else 4.5, 3.5))
    axes = np.atleast_1d(axes)
    kinds = sorted(report["counts"]) or ["none found"]
    axes[0].barh(kinds, [report["counts"].get(k, 0) for k in kinds], color="#2e86c1")
    axes[0].set_title(f"found among {report['samples']} samples")
    if threshold is not None:
        axes[1].hist(nearest, bins=50, range=(0.9, 1.0), color="#7f8c8d")
        axes[1].axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold}")
        axes[1].set_yscale("log")
        axes[1].set_xlabel(f"{report['modality']} cosine to the nearest other sample")
        axes[1].legend()
    save_figure(fig, path)
