"""The linear probe: logistic regression (scikit-learn) on frozen embeddings, per modality.

As CLIP_benchmark does it: the regularisation is swept on a validation split held out of the training
split (a fifth, stratified, seeded), the best strength is refit on the whole training split, and the
test split is scored (top-1, top-5, mean per-class recall).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from contrastive.evaluation.zeroshot import classification_metrics


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    cs: Sequence[float],
    seed: int = 0,
) -> dict[str, float]:
    """Fit on (train_x, train_y) with the C of `cs` best on a held-out fifth; score the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    counts = np.bincount(train_y)
    stratify = train_y if counts[counts > 0].min() >= 2 else None
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed, stratify=stratify)
    scores = []
    for c in cs:
        model = LogisticRegression(C=c, max_iter=2000).fit(fit_x, fit_y)
        scores.append(model.score(val_x, val_y))
    best = cs[int(np.argmax(scores))]  # the first of equals: the strongest regularisation
    model = LogisticRegression(C=best, max_iter=2000).fit(train_x, train_y)
    proba = np.full((len(test_x), int(max(train_y.max(), test_y.max())) + 1), -np.inf)
    proba[:, model.classes_] = model.predict_log_proba(test_x)
    out = classification_metrics(torch.from_numpy(proba), torch.from_numpy(test_y))
    return {**out, "C": float(best)}


def probe_metrics(
    train: dict[str, Any], test: dict[str, Any], *, cs: Sequence[float], text_modality: str = "text", seed: int = 0
) -> dict[str, float]:
    """A probe per modality (text aside) on the samples labelled in both splits, classes by label."""
    classes = sorted({lab for lab in train["labels"] + test["labels"] if lab is not None})
    index = {c: i for i, c in enumerate(classes)}
    metrics: dict[str, float] = {}
    for name in test["embeddings"]:
        if name == text_modality:
            continue
        splits = []
        for part in (train, test):
            rows = [i for i, lab in enumerate(part["labels"]) if lab is not None and bool(part["mask"][name][i])]
            splits.append((part["embeddings"][name][rows].numpy(), np.array([index[part["labels"][i]] for i in rows])))
        (train_x, train_y), (test_x, test_y) = splits
        if len(set(train_y.tolist())) < 2 or not len(test_y):
            continue
        found = linear_probe(train_x, train_y, test_x, test_y, cs=cs, seed=seed)
        metrics.update({f"linear_probe/{name}/{k}": v for k, v in found.items()})
    return metrics
