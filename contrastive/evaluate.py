"""Evaluation: zero-shot classification against text prompts and retrieval for every modality pair.

Each rank embeds its share of the eval shards; the embeddings are gathered so that every rank
computes the same figures on the whole set.

- Zero-shot: class names are the `label`s of the eval data; each class is the normalised mean of
  its prompt embeddings (CLIP's prompt ensembling); accuracy is over samples holding the modality.
- Retrieval: for a pair (a, b), among the samples holding both, each a-embedding ranks every
  b-embedding; R@k is the fraction whose own b is in the top k, median rank is 1-based.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch

from contrastive.data.pipeline import ShardDataset, loader_batches
from contrastive.distributed import gather_no_grad, world_size
from contrastive.model import ContrastiveModel

# Zero-shot class prompts when neither the config nor an export names others.
DEFAULT_PROMPTS = ("a photo of {label}", "{label}")


@dataclass
class EvalConfig:
    """`eval.*`: zero-shot prompts and how much of the held-out set to use."""

    # Zero-shot class prompts; {label} is replaced by each class name found in the eval data.
    prompts: List[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    text_modality: str = "text"
    max_samples: int = 0  # 0 = the whole eval set


@torch.no_grad()
def embed_dataset(
    model: ContrastiveModel, dataset: ShardDataset, *, device: torch.device, max_samples: int = 0, autocast: Any = None
) -> dict[str, Any]:
    """Embeddings of every sample of `dataset` (all ranks' shares): per modality [N, D] and mask [N],
    plus keys and labels. Padding rows are dropped."""
    was_training = model.training
    model.eval()
    names = list(model.encoders)
    chunks: dict[str, list] = {n: [] for n in names}
    masks: dict[str, list] = {n: [] for n in names}
    keys: list[str] = []
    labels: list[Any] = []
    seen = 0
    with loader_batches(dataset) as stream:
        for batch in stream:
            with autocast() if autocast else _null():
                emb = model({n: batch[n].to(device) for n in names})
            for n in names:
                chunks[n].append(gather_no_grad(emb[n].float()).cpu())
                masks[n].append(gather_no_grad(batch["mask"][n].to(device)).cpu())
            keys.extend(_gather_list(batch["__key__"]))
            labels.extend(_gather_list(batch["label"]))
            seen += len(batch["__key__"]) * world_size()
            if max_samples and seen >= max_samples:
                break
    model.train(was_training)
    out: dict[str, Any] = {"embeddings": {}, "mask": {}}
    real = torch.tensor([bool(k) for k in keys])
    for n in names:
        out["embeddings"][n] = torch.cat(chunks[n])[real]
        out["mask"][n] = torch.cat(masks[n])[real]
    out["keys"] = [k for k in keys if k]
    out["labels"] = [lab for k, lab in zip(keys, labels) if k]
    if max_samples:
        out["embeddings"] = {n: e[:max_samples] for n, e in out["embeddings"].items()}
        out["mask"] = {n: m[:max_samples] for n, m in out["mask"].items()}
        out["keys"], out["labels"] = out["keys"][:max_samples], out["labels"][:max_samples]
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _gather_list(items: list[Any]) -> list[Any]:
    if world_size() == 1:
        return list(items)
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def retrieval_metrics(
    a: torch.Tensor, b: torch.Tensor, ks: Sequence[int] = (1, 5, 10), labels: Sequence[Any] | None = None
) -> dict[str, float]:
    """a[i] and b[i] belong together. -> R@k and median rank of a->b (1-based ranks).

    Ties (identical embeddings, e.g. repeated captions) are broken at random in expectation: with g
    items scoring higher than the own match and t others scoring the same, the own match is in the
    top k with probability clamp((k - g) / (t + 1), 0, 1), and its rank is g + t/2 + 1. With `labels`,
    `label_R@1` is the fraction whose best match has the same label (retrieval by concept)."""
    sims = a @ b.T
    own = sims.diagonal()[:, None]
    greater = (sims > own).sum(dim=1).float()
    ties = (sims == own).sum(dim=1).float() - 1
    out = {f"R@{k}": float(((k - greater) / (ties + 1)).clamp(0, 1).mean()) for k in ks}
    out["median_rank"] = float(torch.quantile(greater + ties / 2 + 1, 0.5))  # the mean of the middle two for even n
    if labels is not None:
        best = sims.argmax(dim=1).tolist()
        out["label_R@1"] = sum(labels[j] == labels[i] for i, j in enumerate(best)) / len(best)
    return out


def zero_shot_accuracy(
    emb: torch.Tensor, labels: Sequence[str], class_emb: torch.Tensor, class_names: Sequence[str]
) -> float:
    index = {c: i for i, c in enumerate(class_names)}
    target = torch.tensor([index[lab] for lab in labels])
    pred = (emb @ class_emb.T).argmax(dim=1)
    return float((pred == target).float().mean())


@torch.no_grad()
def class_embeddings(
    model: ContrastiveModel, text_modality: str, class_names: Sequence[str], prompts: Sequence[str]
) -> torch.Tensor:
    """One unit vector per class: the normalised mean of its prompts' embeddings."""
    out = []
    for name in class_names:
        emb = model.embed(text_modality, [p.format(label=name) for p in prompts])
        out.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(out)


def compute_metrics(
    model: ContrastiveModel, embedded: dict[str, Any], *, prompts: Sequence[str], text_modality: str = "text"
) -> dict[str, float]:
    """Zero-shot accuracy of every other modality against `text_modality`, and retrieval of every pair."""
    emb, mask, labels = embedded["embeddings"], embedded["mask"], embedded["labels"]
    metrics: dict[str, float] = {}
    class_names = sorted({lab for lab in labels if lab is not None})
    if text_modality in model.encoders and class_names:
        class_emb = class_embeddings(model, text_modality, class_names, prompts)
        metrics["zero_shot/classes"] = len(class_names)
        for name in emb:
            if name == text_modality:
                continue
            rows = [i for i, lab in enumerate(labels) if lab is not None and bool(mask[name][i])]
            if rows:
                metrics[f"zero_shot/{name}->{text_modality}/acc"] = zero_shot_accuracy(
                    emb[name][rows], [labels[i] for i in rows], class_emb, class_names
                )
    for a, b in itertools.combinations(list(emb), 2):
        both = mask[a] & mask[b]
        n = int(both.sum())
        if n < 2:
            continue
        metrics[f"retrieval/{a}-{b}/n"] = n
        both_labels = [labels[i] for i in both.nonzero().flatten().tolist()]
        if any(lab is None for lab in both_labels):
            both_labels = None
        for src, dst in ((a, b), (b, a)):
            for k, v in retrieval_metrics(emb[src][both], emb[dst][both], labels=both_labels).items():
                metrics[f"retrieval/{src}->{dst}/{k}"] = v
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    """A readable table of the metrics, with chance levels beside the accuracies and recalls."""
    lines = []
    classes = metrics.get("zero_shot/classes")
    zs = sorted(k for k in metrics if k.startswith("zero_shot/") and k.endswith("/acc"))
    if zs:
        lines.append(f"zero-shot classification ({int(classes)} classes, chance {1 / classes:.1%})")
        for k in zs:
            lines.append(f"  {k.split('/')[1]:<22} acc {metrics[k]:6.1%}")
    pairs = sorted({k.split("/")[1] for k in metrics if k.startswith("retrieval/") and "->" in k})
    if pairs:
        lines.append("retrieval                 R@1    R@5   R@10  median rank  label R@1      n  (chance R@1)")
        for p in pairs:
            a, b = p.split("->")
            n = int(metrics.get(f"retrieval/{a}-{b}/n", metrics.get(f"retrieval/{b}-{a}/n", 0)))
            r = [metrics[f"retrieval/{p}/{k}"] for k in ("R@1", "R@5", "R@10", "median_rank")]
            label = metrics.get(f"retrieval/{p}/label_R@1")
            label = f"{label:6.1%}" if label is not None else "     -"
            lines.append(
                f"  {p:<22} {r[0]:6.1%} {r[1]:6.1%} {r[2]:6.1%}  {r[3]:8.1f}     {label}  {n:5d}  ({1 / max(n, 1):.2%})"
            )
    return "\n".join(lines)
