"""`contrastive-data score` and `filter`: each sample's pair cosines from a model, and a copy of the
set with the samples whose scores meet conditions (see contrastive/data_tools/curate.py)."""

from __future__ import annotations

import json
import math
import operator
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from contrastive.data.shards import DataError
from contrastive.data.storage import basename, redact
from contrastive.data_tools.curate import (
    copy_kept,
    embed_set,
    finish_output,
    load_model,
    model_pairs,
    pool,
    prepare_output,
    progress,
    save_figure,
    shard_embeddings,
    source_shards,
)


def parse_pair(text: str, known: Sequence[str] | None = None) -> str:
    """'image,text' or 'image-text' -> 'image-text' (the order `known` uses, if it holds the pair)."""
    parts = [p for p in re.split(r"[,\-]", text.strip()) if p]
    if len(parts) != 2:
        raise DataError(f"{text!r} is not a pair of modalities (write image,text or image-text)")
    name = "-".join(parts)
    if known is None:
        return name
    name = oriented(name, known)
    if name not in known:
        raise DataError(f"no scores for the pair {name}: the scores hold {sorted(known)}")
    return name


def oriented(pair: str, names: Sequence[str]) -> str:
    """`pair` as `names` write it (text-image -> image-text when names hold image-text)."""
    flipped = "-".join(reversed(pair.split("-")))
    return flipped if pair not in names and flipped in names else pair


def score(
    src: str, out: str | Path, *, model: str, pairs: Sequence[str] = (), workers: int = 2, batch_size: int = 256
) -> dict[str, Any]:
    """Writes OUT/<shard>.scores.json ({key: {pair: cosine}}), OUT/score.json and OUT/score.png."""
    out = Path(out)
    have, trained = model_pairs(model)
    wanted = [oriented(parse_pair(p), trained) for p in pairs] or trained
    for name in wanted:
        missing = [m for m in name.split("-") if m not in have]
        if missing:
            raise DataError(f"--pair {name}: the model has no {missing} tower (it has {have})")
    modalities = sorted({m for name in wanted for m in name.split("-")}, key=have.index)
    with pool(workers, load_model, (model,)) as p:
        shards = embed_set(p, model, modalities, src, out / "embeddings", batch_size)
    values: dict[str, list[float]] = {name: [] for name in wanted}
    for shard in shards:
        emb = {m: shard_embeddings(out / "embeddings", shard, m) for m in modalities}
        scores: dict[str, dict[str, float]] = {}
        for name in wanted:
            a, b = name.split("-")
            (xa, ka), (xb, kb) = emb[a], emb[b]
            rows_b = {k: i for i, k in enumerate(kb)}
            for i, key in enumerate(ka):
                if key in rows_b:
                    value = round(float(xa[i] @ xb[rows_b[key]]), 6)
                    scores.setdefault(key, {})[name] = value
                    values[name].append(value)
        stem = shard.name.removesuffix(".tar")
        (out / f"{stem}.scores.json").write_text(json.dumps({"shard": shard.name, "scores": scores}) + "\n")
    report = {
        "data": redact(src),
        "model": model,
        "pairs": {name: summary(v) for name, v in values.items()},
        "shards": [s.name for s in shards],
    }
    (out / "score.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    plot_scores(values, {}, out / "score.png")
    return report


def summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"samples": 0}
    q = np.quantile(np.asarray(values), [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    return {
        "samples": len(values),
        "mean": round(float(np.mean(values)), 6),
        "min": round(float(np.min(values)), 6),
        "max": round(float(np.max(values)), 6),
        "quantiles": {p: round(float(v), 6) for p, v in zip(("1%", "10%", "25%", "50%", "75%", "90%", "99%"), q)},
    }


def plot_scores(values: dict[str, list[float]], thresholds: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(values)), figsize=(4.5 * max(1, len(values)), 3.2), squeeze=False)
    for ax, (name, v) in zip(axes[0], values.items()):
        ax.hist(v, bins=50, color="#4a7ab5")
        if name in thresholds:
            ax.axvline(thresholds[name], color="#c0392b", label=f"kept >= {thresholds[name]:.3f}")
            ax.legend()
        ax.set_title(f"{name} cosine ({len(v)} samples)")
        ax.set_xlabel("score")
    save_figure(fig, path)


def load_scores(scores_dir: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """{shard name: {key: {pair: score}}} from `score`'s output."""
    found = {}
    for path in sorted(Path(scores_dir).glob("*.scores.json")):
        data = json.loads(path.read_text())
        found[data["shard"]] = data["scores"]
    if not found:
        raise DataError(f"{scores_dir} holds no scores: run `contrastive-data score` first")
    return found


CONDITION = re.compile(r"^\s*([A-Za-z0-9_]+[,\-][A-Za-z0-9_]+)\s*(>=|<=|>|<)\s*(-?[0-9]*\.?[0-9]+)\s*$")
COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def conditions(
    keep: Sequence[str], top: Sequence[str], scores: dict[str, dict[str, dict[str, float]]]
) -> list[tuple[str, str, float]]:
    """[(pair, operator, value)] from --keep 'image-text>=0.28' and --top [pair:]30% (the score the
    top share reaches, over the samples holding the pair)."""
    known = sorted({p for shard in scores.values() for s in shard.values() for p in s})
    out = []
    for text in keep:
        m = CONDITION.match(text)
        if not m:
            raise DataError(f"--keep {text!r}: expected PAIR>=VALUE, e.g. 'image-text>=0.28' (or >, <=, <)")
        out.append((parse_pair(m.group(1), known), m.group(2), float(m.group(3))))
    for text in top:
        pair, _, share = text.rpartition(":")
        if not pair:
            if len(known) != 1:
                raise DataError(f"--top {text!r}: the scores hold {known}; name the pair (e.g. image-text:{text})")
            pair = known[0]
        pair = parse_pair(pair, known)
        try:
            fraction = float(share.rstrip("%")) / (100 if share.endswith("%") else 1)
        except ValueError:
            raise DataError(f"--top {text!r}: expected a share such as 30% or 0.3") from None
        if not 0 < fraction <= 1:
            raise DataError(f"--top {text!r}: the share must be in (0, 100%]")
        values = sorted((s[pair] for shard in scores.values() for s in shard.values() if pair in s), reverse=True)
        if not values:
            raise DataError(f"--top {text!r}: no sample holds {pair}")
        out.append((pair, ">=", values[max(0, math.ceil(fraction * len(values)) - 1)]))
    if not out:
        raise DataError("filter: give --keep and/or --top")
    return out


def filter_set(
    src: str,
    dst: str | Path,
    *,
    scores_dir: str | Path,
    keep: Sequence[str] = (),
    top: Sequence[str] = (),
    missing: str = "keep",
    workers: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A copy of `src` with the samples that meet every condition. A sample without a score for a
    condition's pair (it lacks a modality, or it did not decode) is kept or dropped by `missing`. The
    report holds the distribution of each pair's scores it filtered on (a threshold belongs to the
    model that scored: one model's cosines may all lie above another's threshold)."""
    if missing not in ("keep", "drop"):
        raise DataError(f"--missing: keep or drop, not {missing!r}")
    scores = load_scores(scores_dir)
    rules = conditions(keep, top, scores)
    shards = source_shards(src)
    unscored = [s.name for s in shards if s.name not in scores]
    if unscored:
        raise DataError(f"{len(unscored)} shards have no scores (first: {unscored[0]}): score {redact(src)} first")
    out = prepare_output(src, dst, overwrite=overwrite)

    def passes(sample_scores: dict[str, float]) -> bool:
        for pair, op, value in rules:
            if pair not in sample_scores:
                if missing == "drop":
                    return False
                continue
            if not COMPARE[op](float(sample_scores[pair]), value):
                return False
        return True

    drop: dict[str, set[str]] = {}
    for shard in shards:
        by_key = scores[shard.name]
        drop[shard.name] = {k for k, v in by_key.items() if not passes(v)}
    written = write_filtered(shards, out, scores, drop, missing, workers)
    values: dict[str, list[float]] = {}
    for shard in scores.values():
        for s in shard.values():
            for pair, v in s.items():
                values.setdefault(pair, []).append(v)
    thresholds = {pair: value for pair, op, value in rules if op in (">=", ">")}
    plot_scores(values, thresholds, out / "filter.png")
    distribution = {pair: summary(v) for pair, v in values.items()}
    return finish_output(
        out,
        "filter",
        written,
        {
            "source": redact(src),
            "conditions": [f"{p}{op}{v:.6g}" for p, op, v in rules],
            "missing": missing,
            "scores": distribution,
        },
    )


def _copy_scored(location: str, out: str, drop: frozenset[str], scored: frozenset[str], missing: str) -> dict:
    def keep(sample: dict) -> bool:
        key = sample["__key__"]
        if key not in scored:
            return missing == "keep"
        return key not in drop

    return copy_kept(location, Path(out) / basename(location), keep)


def write_filtered(shards, out, scores, drop, missing, workers) -> list[dict]:
    with pool(workers) as p:
        tasks = [
            p.submit(
                _copy_scored,
                s.path,
                str(out),
                frozenset(drop[s.name]),
                frozenset(scores[s.name]),
                missing,
            )
            for s in shards
        ]
        return [t.result() for t in progress(tasks, len(tasks), "filter")]
