"""Zero-shot classification of any modality against text prompts, as CLIP_benchmark scores it.

Each class is the normalised mean of its prompts' normalised text embeddings (CLIP's ensembling); a
sample's scores are its embedding's dot products with the classes. Class names come from a file
(CLIP_benchmark's `classnames.txt`, with a `cls` index per sample) or from the samples' labels;
templates from a file (`{c}`) or `eval.prompts` (`{label}`). Reported: top-1 (`acc`), top-5 (five
classes or more) and the mean per-class recall (scikit-learn's balanced accuracy), over the samples
that hold the modality and a known class.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from contrastive.model import ContrastiveModel


def fill(template: str, name: str) -> str:
    """A template with its class placeholder, `{label}` or CLIP_benchmark's `{c}`, filled in."""
    return template.replace("{label}", name).replace("{c}", name)


@torch.no_grad()
def class_embeddings(
    model: ContrastiveModel, text_modality: str, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """[classes, D]: one unit vector per class, the normalised mean of its prompts' embeddings."""
    out = []
    for name in classnames:
        emb = model.embed(text_modality, [fill(t, name) for t in templates])
        out.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(out)


def class_targets(labels: Sequence[Any], classnames: Sequence[str] | None) -> tuple[list[str], list[int]]:
    """(class names, each sample's class index or -1). Labels are class names, or with class names from
    a file also class indices (CLIP_benchmark's `cls`)."""
    if classnames is None:
        classnames = sorted({lab for lab in labels if lab is not None})
    index = {name: i for i, name in enumerate(classnames)}
    targets = []
    for label in labels:
        if label is None:
            targets.append(-1)
        elif label in index:
            targets.append(index[label])
        elif label.isdigit() and int(label) < len(classnames):
            targets.append(int(label))
        else:
            targets.append(-1)
    return list(classnames), targets


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """top-1 (`acc`), top-5 (with five classes or more) and the mean per-class recall of [N, C] scores."""
    from sklearn.metrics import balanced_accuracy_score

    pred = scores.argmax(dim=1)
    out = {"acc": float((pred == targets).float().mean())}
    if scores.shape[1] >= 5:
        out["top5"] = float((scores.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean())
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected, said per call
        warnings.simplefilter("ignore", UserWarning)
        out["mean_per_class_recall"] = float(balanced_accuracy_score(targets.numpy(), pred.numpy()))
    return out


def zero_shot_metrics(
    model: ContrastiveModel,
    embedded: dict[str, Any],
    *,
    templates: Sequence[str],
    classnames: Sequence[str] | None = None,
    text_modality: str = "text",
) -> dict[str, float]:
    """Every other modality against `text_modality`'s class embeddings."""
    if text_modality not in model.encoders:
        return {}
    classnames, targets = class_targets(embedded["labels"], classnames)
    if not classnames or all(t < 0 for t in targets):
        return {}
    classes = class_embeddings(model, text_modality, classnames, templates)
    target = torch.tensor(targets)
    metrics: dict[str, float] = {"zero_shot/classes": len(classnames)}
    for name, emb in embedded["embeddings"].items():
        rows = embedded["mask"][name] & (target >= 0)
        if name != text_modality and bool(rows.any()):
            found = classification_metrics(emb[rows] @ classes.T, target[rows])
            found.update(per_class_recall((emb[rows] @ classes.T).argmax(dim=1), target[rows], classnames))
            metrics.update({f"zero_shot/{name}->{text_modality}/{k}": v for k, v in found.items()})
    return metrics


PER_CLASS_MAX = 100  # classes up to which each one's recall is a metric of its own


def per_class_recall(pred: torch.Tensor, target: torch.Tensor, classnames: Sequence[str]) -> dict[str, float]:
    """The worst and best class's recall (so an imbalance between classes shows), and with at most
    PER_CLASS_MAX classes, each class's (`class/<name>`)."""
    recalls = {}
    for c in target.unique().tolist():
        rows = target == c
        recalls[classnames[c]] = float((pred[rows] == c).float().mean())
    out = {"worst_class_recall": min(recalls.values()), "best_class_recall": max(recalls.values())}
    if len(classnames) <= PER_CLASS_MAX:
        out.update({f"class/{name.replace('/', '_')}": r for name, r in recalls.items()})
    return out
