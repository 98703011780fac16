"""`contrastive-data dedup`: exact copies by hash and near copies by embedding, within a set and
against evaluation sets (see contrastive/data_tools/curate.py)."""

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
    shard_embeddings,
    source_shards,
    write_without,
)
from contrastive.modalities import MODALITIES

EXACT_INDEX_LIMIT = 100_000  # above this many vectors, search an IVF index instead of all pairs


def _hash_shard(location: str, modality: str) -> tuple[list[tuple[str, str]], str | None]:
    rows, error = [], None
    try:
        for sample in iter_tar_samples(location):
            content = content_of(sample, modality)
            if content is not None:
                rows.append((sample["__key__"], hashlib.sha256(content).hexdigest()))
    except Exception as e:
        error = f"{type(e).__name__}: {redact(str(e))}"
    return rows, error


def hashes(p: ProcessPoolExecutor, src: str, modality: str) -> list[tuple[str, str, str]]:
    """[(shard, key, sha256 of the modality's bytes)] in the set's order."""
    shards = source_shards(src)
    found = map_shards(p, partial(_hash_shard, modality=modality), shards, f"hashing {redact(src)}")
    return [(s.name, key, digest) for s, (rows, _) in zip(shards, found) for key, digest in rows]


def finding(key: str, shard: str, of: str, kind: str, score: float, in_set: str | None = None) -> dict[str, Any]:
    """One duplicate (or, with `in_set`, one leak): the sample, its shard, the sample it copies."""
    out = {"key": key, "shard": shard, "of": of, "kind": kind, "score": round(float(score), 6)}
    return out | ({"set": redact(in_set)} if in_set is not None else {})


def neighbours(index_vectors: np.ndarray, queries: np.ndarray, threshold: float):
    """faiss range search: (lims, scores, ids) of every index vector with cosine >= threshold, exact
    up to EXACT_INDEX_LIMIT vectors, an IVF index (nprobe 16) above."""
    import faiss

    x = np.ascontiguousarray(index_vectors, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
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
    return index.range_search(q, float(threshold))


def dedup(
    src: str,
    *,
    against: Sequence[str] = (),
    model: str | None = None,
    modality: str = "image",
    threshold: float = 0.95,
    out: str | Path | None = None,
    work: str | Path | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Duplicates within `src` (a later sample matching an earlier one is the duplicate) and leaks of
    `against` sets into it, by `modality`: exact copies by the hash of its bytes, then, with a model,
    near copies by the cosine of their embeddings >= `threshold`. The report lists each with the
    sample it copies; with `out`, a copy of `src` without them."""
    if modality not in MODALITIES:
        raise DataError(f"--modality {modality!r}: one of {sorted(MODALITIES)}")
    if out is not None:
        prepare_output(src, out)
    loader = (load_model, (model,)) if model else (None, ())
    with pool(workers, *loader) as p, tempfile.TemporaryDirectory() as tmp:
        work = Path(work or (Path(out) / "dedup-work" if out else tmp))
        return find_copies(p, src, against, model, modality, threshold, out, work)


def find_copies(p, src, against, model, modality, threshold, out, work) -> dict[str, Any]:
    rows = hashes(p, src, modality)
    first: dict[str, tuple[str, str]] = {}
    found: dict[str, dict[str, Any]] = {}  # key -> finding
    for shard, key, digest in rows:
        if digest in first:
            found[key] = finding(key, shard, first[digest][1], "exact", 1.0)
        else:
            first[digest] = (shard, key)
    leaks: dict[str, dict[str, Any]] = {}
    for name in against:
        theirs = {digest: key for _, key, digest in hashes(p, name, modality)}
        for shard, key, digest in rows:
            if digest in theirs and key not in leaks:
                leaks[key] = finding(key, shard, theirs[digest], "exact", 1.0, name)
    if model is not None:
        near_duplicates(p, src, against, model, modality, threshold, work, found, leaks)
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
    return finish_output(Path(out), "dedup", write_without(p, shards, Path(out), drop), report)


def near_duplicates(p, src, against, model, modality, threshold, work, found, leaks) -> None:
    """Adds the near copies (embedding cosine >= threshold) to `found` and `leaks`."""
    shards = embed_set(p, model, [modality], src, work / "source")
    parts = [(s.name, *shard_embeddings(work / "source", s, modality)) for s in shards]
    vectors = np.concatenate([x for _, x, _ in parts]) if parts else np.zeros((0, 1), np.float32)
    where = [(shard, key) for shard, _, keys in parts for key in keys]
    if len(vectors):
        lims, scores, ids = neighbours(vectors, vectors, threshold)
        for i, (shard, key) in enumerate(where):
            earlier = [(j, s) for j, s in zip(ids[lims[i] : lims[i + 1]], scores[lims[i] : lims[i + 1]]) if j < i]
            if earlier and key not in found:
                j, s = max(earlier, key=lambda hit: (hit[1], -hit[0]))  # the closest earlier sample
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
