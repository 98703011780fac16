"""Retrieval for every modality pair, both directions, counted as CLIP_benchmark and open_clip count it.

Samples that share a group (`json.group`; else each sample is its own) are one item, and the captions
of an item (its samples' texts, and every line of a multi-line caption) are its entries on the text
side. The other side holds one entry per item. A query hits at K when an entry of its own item is among
the K best candidates: text->image, the caption's image; image->text, any of the image's captions.
Ties between identical scores count at their expected rank.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch

RECALL_KS = (1, 5, 10)


def group_recall(
    queries: torch.Tensor,
    query_groups: torch.Tensor,
    candidates: torch.Tensor,
    candidate_groups: torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    query_labels: Sequence[Any] | None = None,
    candidate_labels: Sequence[Any] | None = None,
    block: int = 1024,
) -> dict[str, float]:
    """R@k and median rank (1-based) of queries against candidates, a candidate being right for a query
    when their groups are equal (every query has at least one). With g wrong candidates scoring above
    the best right one and t scoring the same, the query hits at k with probability
    clamp((k - g) / (t + 1), 0, 1) and its rank is g + t/2 + 1. With labels, `label_R@1` is the
    fraction whose best candidate carries the query's label (retrieval by concept)."""
    hits = {k: [] for k in ks}
    ranks, label_hits = [], []
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ candidates.T
        right = query_groups[start : start + block, None] == candidate_groups[None, :]
        best = scores.masked_fill(~right, float("-inf")).max(dim=1, keepdim=True).values
        greater = ((scores > best) & ~right).sum(dim=1).float()
        ties = ((scores == best) & ~right).sum(dim=1).float()
        for k in ks:
            hits[k].append(((k - greater) / (ties + 1)).clamp(0, 1))
        ranks.append(greater + ties / 2 + 1)
        if query_labels is not None and candidate_labels is not None:
            top = scores.argmax(dim=1).tolist()
            label_hits += [candidate_labels[j] == query_labels[start + i] for i, j in enumerate(top)]
    out = {f"R@{k}": float(torch.cat(hits[k]).mean()) for k in ks}
    out["median_rank"] = float(torch.quantile(torch.cat(ranks), 0.5))  # the mean of the middle two for even n
    if label_hits:
        out["label_R@1"] = sum(label_hits) / len(label_hits)
    return out


def _group_ids(embedded: dict[str, Any]) -> torch.Tensor:
    """One int per sample: its group's, or its own (key) without one."""
    names = [g if g is not None else f"\0{k}" for g, k in zip(embedded["groups"], embedded["keys"])]
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(n, len(index)) for n in names], dtype=torch.long)


def entries(
    embedded: dict[str, Any], name: str, rows: torch.Tensor, groups: torch.Tensor, captions: bool
) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """(embeddings, groups, labels) of modality `name`'s entries among the samples `rows` (bool [N]):
    with `captions`, every sample's and its further inputs'; else one per group (its first sample)."""
    picked = rows.nonzero().flatten()
    if not captions:
        first: dict[int, int] = {}
        for i in picked.tolist():
            first.setdefault(int(groups[i]), i)
        picked = torch.tensor(sorted(first.values()), dtype=torch.long)
    emb = [embedded["embeddings"][name][picked]]
    owner = [picked]
    extra = embedded.get("extra", {}).get(name)
    if captions and extra is not None and len(extra["rows"]):
        keep = rows[extra["rows"]]
        emb.append(extra["embeddings"][keep])
        owner.append(extra["rows"][keep])
    owner_rows = torch.cat(owner)
    labels = [embedded["labels"][i] for i in owner_rows.tolist()]
    return torch.cat(emb), groups[owner_rows], labels


def retrieval_metrics(embedded: dict[str, Any], *, text_modality: str = "text") -> dict[str, float]:
    """Every pair of modalities over the samples holding both, both directions: R@1/5/10, median rank,
    label R@1 (when every sample is labelled); `n` is the number of items, `captions` of text entries."""
    groups = _group_ids(embedded)
    mask = embedded["mask"]
    metrics: dict[str, float] = {}
    for a, b in itertools.combinations(list(embedded["embeddings"]), 2):
        rows = mask[a] & mask[b]
        items = len(set(groups[rows].tolist()))
        if items < 2:
            continue
        metrics[f"retrieval/{a}-{b}/n"] = items
        side = {m: entries(embedded, m, rows, groups, captions=m == text_modality) for m in (a, b)}
        if text_modality in side:
            metrics[f"retrieval/{a}-{b}/captions"] = len(side[text_modality][0])
        labelled = all(lab is not None for m in (a, b) for lab in side[m][2])
        for src, dst in ((a, b), (b, a)):
            (q, qg, ql), (c, cg, cl) = side[src], side[dst]
            found = group_recall(
                q, qg, c, cg, query_labels=ql if labelled else None, candidate_labels=cl if labelled else None
            )
            metrics.update({f"retrieval/{src}->{dst}/{k}": v for k, v in found.items()})
    return metrics
