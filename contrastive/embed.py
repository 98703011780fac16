"""Embeddings of whole datasets, shard by shard, resumable; and nearest-neighbour search over them.

    OUT/
      embed.json                     the model and dataset embedded, the modalities
      <shard>.<modality>.npy         float32 [n, embed_dim], unit norm, one row per sample holding it
      <shard>.meta.json              keys and labels of those rows, per modality; bad-input counts
      <shard>.done                   written last: the shard is finished and is skipped on a rerun

Shards are split over ranks (shard i on rank i % world size), so `torchrun --nproc_per_node N`
embeds N shards at a time.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from contrastive.data.decode import BatchDecoder
from contrastive.data.shards import Shard
from contrastive.data.sources import read_segments
from contrastive.model import ContrastiveModel

log = logging.getLogger("contrastive.embed")


def _stem(shard: Shard) -> str:
    return shard.name.removesuffix(".tar")


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


@torch.no_grad()
def embed_shard(
    model: ContrastiveModel, shard: Shard, out_dir: Path, *, modalities: Sequence[str], batch_size: int = 256
) -> Counter:
    """Embeds every sample of `shard`; writes its files, the `.done` marker last."""
    device = next(model.parameters()).device
    decoder = BatchDecoder({m: model.modalities[m] for m in modalities}, train=False)
    emb: dict[str, list] = {m: [] for m in modalities}
    keys: dict[str, list] = {m: [] for m in modalities}
    labels: dict[str, list] = {m: [] for m in modalities}
    counts: Counter = Counter()
    slots = read_segments([(shard, 0, shard.samples, None)])
    while True:
        group = [slot for _, slot in zip(range(batch_size), slots)]
        if not group:
            break
        batch = decoder(group)
        counts.update(batch["counts"])
        for m in modalities:
            rows = batch["mask"][m].nonzero().flatten()
            if len(rows):
                emb[m].append(model.encode(m, batch[m][rows].to(device)).float().cpu().numpy())
                keys[m] += [batch["__key__"][i] for i in rows.tolist()]
                labels[m] += [batch["label"][i] for i in rows.tolist()]
    stem = _stem(shard)
    for m in modalities:
        array = np.concatenate(emb[m]) if emb[m] else np.zeros((0, model.embed_dim), np.float32)
        _save_npy(out_dir / f"{stem}.{m}.npy", array)
    meta = {
        "shard": shard.name,
        "keys": keys,
        "labels": labels,
        "counts": {k: v for k, v in counts.items() if not k.startswith("bad_in_shard/")},
    }
    (out_dir / f"{stem}.meta.json").write_text(json.dumps(meta) + "\n")
    (out_dir / f"{stem}.done").write_text("")
    return counts


def embed_shards(
    model: ContrastiveModel,
    shards: Sequence[Shard],
    out_dir: str | os.PathLike,
    *,
    modalities: Sequence[str],
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, int]:
    """This rank's shards, skipping those already finished. Returns {"embedded": n, "skipped": m}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [s for i, s in enumerate(shards) if i % world_size == rank]
    todo = [s for s in mine if not (out / f"{_stem(s)}.done").exists()]
    if len(todo) < len(mine):
        log.info(
            "rank %d: %d of its %d shards are finished already; embedding the other %d",
            rank,
            len(mine) - len(todo),
            len(mine),
            len(todo),
        )
    for shard in todo:
        counts = embed_shard(model, shard, out, modalities=modalities, batch_size=batch_size)
        log.info(
            "embedded %s: %s",
            shard.name,
            ", ".join(f"{m} {counts.get(f'present/{m}', 0)}" for m in modalities)
            + (
                f"; bad input skipped: {dict((k, v) for k, v in counts.items() if k.startswith('bad/'))}"
                if any(k.startswith("bad/") for k in counts)
                else ""
            ),
        )
    return {"embedded": len(todo), "skipped": len(mine) - len(todo)}


def load_embeddings(out_dir: str | os.PathLike, modality: str) -> tuple[np.ndarray, list[str], list[Any]]:
    """All finished shards' embeddings of `modality`: ([N, D], keys, labels)."""
    out = Path(out_dir)
    arrays, keys, labels = [], [], []
    for done in sorted(out.glob("*.done")):
        stem = done.name.removesuffix(".done")
        meta = json.loads((out / f"{stem}.meta.json").read_text())
        arrays.append(np.load(out / f"{stem}.{modality}.npy"))
        keys += meta["keys"][modality]
        labels += meta["labels"][modality]
    if not arrays:
        raise FileNotFoundError(f"{out_dir} holds no finished {modality} embeddings")
    return np.concatenate(arrays), keys, labels


def nearest(index: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products (cosine, for unit vectors): faiss when installed, exact NumPy otherwise."""
    k = min(k, len(index))
    try:
        import faiss
    except ImportError:
        scores = queries @ index.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        return np.take_along_axis(scores, top, axis=1), top
    search = faiss.IndexFlatIP(index.shape[1])
    search.add(np.ascontiguousarray(index, dtype=np.float32))
    scores, top = search.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, top
