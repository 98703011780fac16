"""A set's embeddings, computed once and shared by zero-shot, retrieval and the linear probe.

Each rank embeds its share of the shards; the embeddings are gathered so that every rank holds the
whole set: batch by batch where the set is counted (every rank makes as many batches), or once at
the end where it is counted as it streams (a set without sizes.json: ranks make different numbers).
Besides one embedding per modality and sample, a sample may hold further inputs of a modality (an
image's other captions, one a line): those are embedded too, with the row they belong to.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

from contrastive.data.pipeline import ShardDataset, loader_batches
from contrastive.distributed import gather_no_grad, gather_objects, rank, world_size
from contrastive.model import ContrastiveModel


def gather_items(items: list[Any]) -> list[Any]:
    """Every rank's `items`, concatenated in rank order."""
    return [x for part in gather_objects(list(items)) for x in part]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _gather_streamed(names, chunks, masks, extra_emb, extra_rows, keys, labels, groups):
    """Every rank's rows of a streamed set, concatenated in rank order (further inputs' rows shifted by
    the rows of the ranks before)."""
    mine = {
        "chunks": {n: torch.cat(chunks[n]) if chunks[n] else torch.empty(0) for n in names},
        "masks": {n: torch.cat(masks[n]) if masks[n] else torch.empty(0, dtype=torch.bool) for n in names},
        "extra": {n: (torch.cat(extra_emb[n]), torch.cat(extra_rows[n])) for n in names if extra_emb[n]},
        "keys": keys,
        "labels": labels,
        "groups": groups,
    }
    out = ({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}, [], [], [])
    for part in gather_items([mine]):
        before = len(out[4])
        for n in names:
            if len(part["keys"]):
                out[0][n].append(part["chunks"][n])
                out[1][n].append(part["masks"][n])
        for n, (embedded, rows) in part["extra"].items():
            out[2][n].append(embedded)
            out[3][n].append(rows + before)
        out[4].extend(part["keys"])
        out[5].extend(part["labels"])
        out[6].extend(part["groups"])
    return out


def average_views(
    model: ContrastiveModel, name: str, main: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Each row's embedding averaged with those of its further views (`rows` says whose), renormalised."""
    total = main.float().clone().index_add_(0, rows, model.encode(name, inputs).float())
    count = torch.ones(len(main), device=main.device).index_add_(0, rows, torch.ones(len(rows), device=main.device))
    return torch.nn.functional.normalize(total / count[:, None], dim=-1)


@torch.no_grad()
def embed_dataset(
    model: ContrastiveModel,
    dataset: ShardDataset,
    *,
    device: torch.device,
    max_samples: int = 0,
    autocast: Callable[[], Any] | None = None,
    modalities: list[str] | None = None,
) -> dict[str, Any]:
    """Every sample of `dataset` (all ranks' shares), padding dropped (a value seen in several views, a
    long clip's windows, embedded as their average):

    embeddings: {modality: [N, D]}, mask: {modality: [N]} (the samples holding it),
    keys, labels, groups: [N] (json.label / cls, json.group; None where absent),
    extra: {modality: {"embeddings": [M, D], "rows": [M]}} (further inputs, by their sample's row)
    """
    was_training = model.training
    model.eval()
    names = modalities or list(model.encoders)  # `modalities`: each embedded as if the others were absent
    chunks: dict[str, list] = {n: [] for n in names}
    masks: dict[str, list] = {n: [] for n in names}
    extra_emb: dict[str, list] = {n: [] for n in names}
    extra_rows: dict[str, list] = {n: [] for n in names}
    keys: list[str] = []
    labels: list[Any] = []
    groups: list[Any] = []
    rows_before = 0  # rows gathered so far, padding included
    gather, gather_list = (gather_no_grad, gather_items) if not dataset.streamed else (_local, list)
    with loader_batches(dataset) as stream:
        for batch in stream:
            with autocast() if autocast else nullcontext():
                emb = model({n: batch[n].to(device) for n in names})
                for n, views in (batch.get("views") or {}).items():  # a long clip's windows: averaged
                    if n in names:
                        emb[n] = average_views(model, n, emb[n], views["inputs"].to(device), views["rows"].to(device))
                mine = {}
                for n, extra in (batch.get("extra") or {}).items():
                    if n in names:
                        inputs = extra["inputs"].split(max(len(batch["__key__"]), 1))
                        embedded = torch.cat([model.encode(n, x.to(device)).float().cpu() for x in inputs])
                        ranks_before = rank() * len(batch["__key__"]) if not dataset.streamed else 0
                        mine[n] = (embedded, extra["rows"] + ranks_before)
            for n in names:
                chunks[n].append(gather(emb[n].float()).cpu())
                masks[n].append(gather(batch["mask"][n].to(device)).cpu())
            for part in gather_list([mine]):  # further inputs: their number differs by rank
                for n, (embedded, rows) in part.items():
                    extra_emb[n].append(embedded)
                    extra_rows[n].append(rows + rows_before)
            keys.extend(gather_list(batch["__key__"]))
            labels.extend(gather_list(batch["label"]))
            groups.extend(gather_list(batch.get("group") or [None] * len(batch["__key__"])))
            rows_before += len(batch["__key__"]) * (world_size() if not dataset.streamed else 1)
            if max_samples and sum(bool(k) for k in keys) >= max_samples:
                break
    model.train(was_training)
    if dataset.streamed:  # each rank's rows, then one gather, in rank order
        chunks, masks, extra_emb, extra_rows, keys, labels, groups = _gather_streamed(
            names, chunks, masks, extra_emb, extra_rows, keys, labels, groups
        )
    real = torch.tensor([bool(k) for k in keys])
    if max_samples:  # the first max_samples real rows
        real &= real.cumsum(0) <= max_samples
    new_row = real.long().cumsum(0) - 1  # padding dropped: a row's index among the real ones
    out: dict[str, Any] = {
        "embeddings": {n: torch.cat(chunks[n])[real] for n in names},
        "mask": {n: torch.cat(masks[n])[real] for n in names},
        "keys": [k for k, r in zip(keys, real.tolist()) if r],
        "labels": [lab for lab, r in zip(labels, real.tolist()) if r],
        "groups": [g for g, r in zip(groups, real.tolist()) if r],
        "extra": {},
    }
    for n in names:
        if extra_emb[n]:
            rows = torch.cat(extra_rows[n])
            keep = real[rows]
            out["extra"][n] = {"embeddings": torch.cat(extra_emb[n])[keep], "rows": new_row[rows[keep]]}
    return out
