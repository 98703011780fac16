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

    fit, val = validation_split(train_y, seed=seed)
    fit_x, val_x, fit_y, val_y = train_x[fit], train_x[val], train_y[fit], train_y[val]
    if len(val):
        scores = [LogisticRegression(C=c, max_iter=2000).fit(fit_x, fit_y).score(val_x, val_y) for c in cs]
        best = cs[int(np.argmax(scores))]  # the first of equals: the strongest regularisation
    else:  # one sample a class: nothing to validate on; scikit-learn's default strength (nearest)
        best = min(cs, key=lambda c: abs(np.log(c)))
    model = LogisticRegression(C=best, max_iter=2000).fit(train_x, train_y)
    proba = np.full((len(test_x), int(max(train_y.max(), test_y.max())) + 1), -np.inf)
    proba[:, model.classes_] = model.predict_log_proba(test_x)
    out = classification_metrics(torch.from_numpy(proba), torch.from_numpy(test_y))
    return {**out, "C": float(best)}


def validation_split(labels: np.ndarray, *, seed: int = 0, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): a seeded fifth held out, stratified when every class has two samples
    and the fifth can hold one of each (scikit-learn's split); otherwise (few-shot sets: 1000 classes
    of 4) a fifth of each class that has more than one sample, so that every class stays in the fit."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    if counts[counts > 0].min() >= 2 and int(np.ceil(fraction * len(labels))) >= classes:
        return tuple(train_test_split(rows, test_size=fraction, random_state=seed, stratify=labels))
    rng = np.random.default_rng(seed)
    held = []
    for c in np.flatnonzero(counts > 1):
        members = rows[labels == c]
        take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held.extend(rng.choice(members, size=take, replace=False).tolist())
    val = np.sort(np.array(held, dtype=int))
    return np.setdiff1d(rows, val), val


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
