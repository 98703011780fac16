"""Curate a dataset before training: score, filter, balance by concept, remove duplicates and leaks.

    contrastive-data score SRC --model EXPORT --out scores/              # each sample's pair cosines
    contrastive-data filter SRC DST --scores scores/ --keep 'image-text>=0.28'   # or --top 70%
    contrastive-data balance SRC DST --concepts entries.txt --t 20000    # MetaCLIP's per-entry cap
    contrastive-data dedup SRC --against EVAL... --model EXPORT --out DST   # duplicates and leaks
    contrastive-data pollute SRC DST --against EVAL                      # plant known problems (to measure)

Every command streams over the shards (local or remote, as training reads them), one shard per task
in `--workers` processes, and never touches its source. Commands that write a set write one shard per
source shard (the same name, the samples kept in their order; a shard left empty is not written),
`sizes.json`, and a JSON report with a PNG beside it; the output is byte-identical whatever the
number of workers: every decision depends on the sample (its key, its bytes, its embedding computed
on one thread), never on which worker saw it. Embeddings (`score`, `dedup --model`) are
`contrastive-embed`'s files under the output, finished shards skipped on a rerun.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import operator
import random
import re
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from contrastive.data.shards import SIZES_FILE, DataError, Shard, list_shards, write_shard
from contrastive.data.sources import iter_tar_samples
from contrastive.data.storage import STORAGE_OPTIONS, configure_storage, redact
from contrastive.modalities import MODALITIES

log = logging.getLogger("contrastive.curate")

REPORT = "curation.json"
EXACT_INDEX_LIMIT = 100_000  # above this many vectors, dedup searches an IVF index instead of all pairs


# -- shared: workers, progress, output sets --------------------------------------------------------
def pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """Worker processes (spawned: torch in a forked child can hang), each on one thread, reading
    with this process's storage options."""
    return ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=get_context("spawn"),
        initializer=_worker_init,
        initargs=(dict(STORAGE_OPTIONS), initializer, initargs),
    )


def _worker_init(storage_options: dict, initializer: Callable | None, initargs: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    configure_storage(storage_options)
    if initializer is not None:
        initializer(*initargs)


def progress(items: Iterable, total: int, what: str) -> Iterator:
    """`items`, with a progress bar on a terminal and a plain line every tenth otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=what, unit="shard")
        return
    step = max(1, total // 10)
    for done, item in enumerate(items, 1):
        if done % step == 0 or done == total:
            log.info("%s: %d/%d shards", what, done, total)
        yield item


def source_shards(src: str) -> list[Shard]:
    shards = list_shards(src, count=False)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise DataError(f"{redact(src)}: two shards share a name; curated sets keep the source's shard names")
    return shards


def prepare_output(src: str, dst: str | Path) -> Path:
    """An output directory for a curated copy: never the source, never someone else's shards."""
    out = Path(dst)
    if "://" not in src and not src.startswith("pipe:") and out.resolve() == Path(src).resolve():
        raise DataError(f"the output {dst} is the source: curation never modifies its input")
    if out.exists() and any(out.glob("*.tar")):
        if not (out / REPORT).exists():
            raise DataError(f"{dst} holds shards contrastive-data did not write: choose an empty directory")
        for old in out.glob("*.tar"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def copy_kept(location: str, target: Path, keep: Callable[[dict], bool]) -> dict[str, Any]:
    """Copies the samples of one shard that `keep` accepts, in their order and byte for byte, into
    `target` (not written when none is kept). A shard that breaks partway keeps what came before."""
    kept: list[dict] = []
    dropped, error = 0, None
    try:
        for sample in iter_tar_samples(location):
            if keep(sample):
                kept.append(sample)
            else:
                dropped += 1
    except Exception as e:  # a damaged tar costs its remaining samples, never the command
        error = f"{type(e).__name__}: {redact(str(e))}"
    if kept:
        write_shard(target, kept)
    return {"shard": target.name, "kept": len(kept), "dropped": dropped, "error": error}


def finish_output(out: Path, command: str, shards: list[dict], report: dict[str, Any]) -> dict[str, Any]:
    """Writes sizes.json and the report; returns the report."""
    sizes = {s["shard"]: s["kept"] for s in shards if s["kept"]}
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    report = {
        "command": command,
        **report,
        "kept": sum(s["kept"] for s in shards),
        "dropped": sum(s["dropped"] for s in shards),
        "broken_shards": {s["shard"]: s["error"] for s in shards if s["error"]},
        "shards": shards,
    }
    (out / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def _copy_without(location: str, out: str, drop: frozenset[str]) -> dict[str, Any]:
    return copy_kept(location, Path(out) / Path(location).name, lambda s: s["__key__"] not in drop)


def write_without(p: ProcessPoolExecutor, src_shards: list[Shard], out: Path, drop: dict[str, set[str]]) -> list:
    """Copies every shard without the keys `drop` names for it ({shard name: keys})."""
    tasks = [p.submit(_copy_without, s.path, str(out), frozenset(drop.get(s.name, ()))) for s in src_shards]
    return [t.result() for t in progress(tasks, len(tasks), "write")]


def map_shards(p: ProcessPoolExecutor, fn: Callable, shards: list[Shard], what: str) -> list:
    """fn(shard location) for every shard, in order, in the pool `p`."""
    return list(progress(p.map(fn, [s.path for s in shards]), len(shards), what))


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})  # no version stamp: the same bytes every time
    import matplotlib.pyplot as plt

    plt.close(fig)


def unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): a sample's draw, whichever worker reads it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64


# -- embeddings (score, dedup) ---------------------------------------------------------------------
_MODEL: Any = None


def load_model(spec: str) -> None:
    global _MODEL
    from contrastive.export import load_model_spec

    _MODEL = load_model_spec(spec)[0]


def _embed_shard(shard: Shard, out: str, modalities: list[str], batch_size: int) -> str:
    from contrastive.embed import embed_shard

    embed_shard(_MODEL, shard, Path(out), modalities=modalities, batch_size=batch_size)
    return shard.name


def embed_set(
    p: ProcessPoolExecutor, model_spec: str, modalities: list[str], src: str, out: Path, batch_size: int = 256
) -> list[Shard]:
    """contrastive-embed's files for `src` under `out` (finished shards kept), computed in `p` (a
    pool made with the model: pool(workers, load_model, (model_spec,))); returns the shards."""
    shards = source_shards(src)
    out.mkdir(parents=True, exist_ok=True)
    made = {"model": model_spec, "data": redact(src), "modalities": modalities}
    (out / "embed.json").write_text(json.dumps(made, indent=1) + "\n")
    todo = [s for s in shards if not (out / f"{s.name.removesuffix('.tar')}.done").exists()]
    run = partial(_embed_shard, out=str(out), modalities=modalities, batch_size=batch_size)
    for _ in progress(p.map(run, todo), len(todo), f"embedding {redact(src)}"):
        pass
    return shards


def shard_embeddings(out: Path, shard: Shard, modality: str) -> tuple[np.ndarray, list[str]]:
    stem = shard.name.removesuffix(".tar")
    meta = json.loads((out / f"{stem}.meta.json").read_text())
    return np.load(out / f"{stem}.{modality}.npy"), meta["keys"][modality]


def model_pairs(model_spec: str) -> tuple[list[str], list[str]]:
    """(the model's modalities, its pairs: as it was trained where known, else every two)."""
    from contrastive.export import load_model_spec

    model, scales = load_model_spec(model_spec)
    have = list(model.modalities)
    return have, list(scales) or [f"{a}-{b}" for i, a in enumerate(have) for b in have[i + 1 :]]


# -- score -------------------------------------------------------------------------------------------
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


# -- filter ------------------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """A copy of `src` with the samples that meet every condition. A sample without a score for a
    condition's pair (it lacks a modality, or it did not decode) is kept or dropped by `missing`."""
    if missing not in ("keep", "drop"):
        raise DataError(f"--missing: keep or drop, not {missing!r}")
    scores = load_scores(scores_dir)
    rules = conditions(keep, top, scores)
    shards = source_shards(src)
    unscored = [s.name for s in shards if s.name not in scores]
    if unscored:
        raise DataError(f"{len(unscored)} shards have no scores (first: {unscored[0]}): score {redact(src)} first")
    out = prepare_output(src, dst)

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
    return finish_output(
        out,
        "filter",
        written,
        {"source": redact(src), "conditions": [f"{p}{op}{v:.6g}" for p, op, v in rules], "missing": missing},
    )


def _copy_scored(location: str, out: str, drop: frozenset[str], scored: frozenset[str], missing: str) -> dict:
    def keep(sample: dict) -> bool:
        key = sample["__key__"]
        if key not in scored:
            return missing == "keep"
        return key not in drop

    return copy_kept(location, Path(out) / Path(location).name, keep)


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


# -- balance (MetaCLIP) -------------------------------------------------------------------------------
_MATCHER: Any = None


def _build_matcher(entries: tuple[str, ...]) -> None:
    import ahocorasick

    global _MATCHER
    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(entries):
        automaton.add_word(entry, (index, len(entry)))
    automaton.make_automaton()
    _MATCHER = automaton


def caption_of(sample: dict) -> str | None:
    for ext in MODALITIES["text"].extensions:
        if ext in sample:
            return sample[ext].decode("utf-8", errors="replace").lower()
    return None


def matches(text: str, word: bool) -> set[int]:
    """Entry indices found in `text` (lower case): as substrings (MetaCLIP), or with `word` only where
    the match is not inside a longer word."""
    found = set()
    for end, (index, length) in _MATCHER.iter(text):
        start = end - length + 1
        if word and ((start > 0 and text[start - 1].isalnum()) or (end + 1 < len(text) and text[end + 1].isalnum())):
            continue
        found.add(index)
    return found


def _count_shard(location: str, word: bool) -> tuple[Counter, int, int, str | None]:
    counts: Counter = Counter()
    samples = unmatched = 0
    error = None
    try:
        for sample in iter_tar_samples(location):
            samples += 1
            text = caption_of(sample)
            found = matches(text, word) if text is not None else set()
            counts.update(found)
            unmatched += not found
    except Exception as e:
        error = f"{type(e).__name__}: {redact(str(e))}"
    return counts, samples, unmatched, error


def _balance_shard(
    location: str, out: str, counts: dict[int, int], t: int, seed: int, word: bool, keep_unmatched: bool
) -> tuple[dict, Counter]:
    after: Counter = Counter()

    def keep(sample: dict) -> bool:
        text = caption_of(sample)
        found = matches(text, word) if text is not None else set()
        if not found:
            return keep_unmatched
        if unit(seed, sample["__key__"]) < min(1.0, t / min(counts[i] for i in found)):
            after.update(found)
            return True
        return False

    return copy_kept(location, Path(out) / Path(location).name, keep), after


def read_entries(path: str | Path) -> list[str]:
    """Concept entries, one a line (lower-cased, duplicates and blank lines dropped, order kept)."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.strip().lower()
        if entry and entry not in entries:
            entries.append(entry)
    if not entries:
        raise DataError(f"{path} holds no concept entries (one a line)")
    return entries


def balance(
    src: str,
    dst: str | Path,
    *,
    concepts: str | Path,
    t: int,
    seed: int = 0,
    word: bool = False,
    keep_unmatched: bool = False,
    workers: int = 2,
) -> dict[str, Any]:
    """MetaCLIP's balancing: count each entry's matches in the captions, then keep a sample with
    probability min(1, t / count) of the rarest entry it matches (a tail entry's samples all stay, a
    head entry's are cut to about t). Samples matching no entry are dropped unless `keep_unmatched`."""
    if t < 1:
        raise DataError("--t: a positive count per entry")
    entries = tuple(read_entries(concepts))
    shards = source_shards(src)
    out = prepare_output(src, dst)
    before: Counter = Counter()
    samples = unmatched = 0
    with pool(workers, _build_matcher, (entries,)) as p:
        counted = map_shards(p, partial(_count_shard, word=word), shards, "count")
        for counts, n, none, _ in counted:
            before.update(counts)
            samples += n
            unmatched += none
        run = partial(
            _balance_shard,
            out=str(out),
            counts=dict(before),
            t=t,
            seed=seed,
            word=word,
            keep_unmatched=keep_unmatched,
        )
        results = map_shards(p, run, shards, "balance")
    written = [r for r, _ in results]
    after = sum((a for _, a in results), Counter())
    plot_balance(before, after, t, out / "balance.png")
    per_entry = {
        entries[i]: {"before": before[i], "after": after[i]} for i in sorted(before, key=lambda i: (-before[i], i))
    }
    return finish_output(
        out,
        "balance",
        written,
        {
            "source": redact(src),
            "t": t,
            "seed": seed,
            "match": "word" if word else "substring",
            "entries": len(entries),
            "entries_matched": len(before),
            "samples": samples,
            "unmatched": unmatched,
            "keep_unmatched": keep_unmatched,
            "per_entry": per_entry,
        },
    )


def plot_balance(before: Counter, after: Counter, t: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(before, key=lambda i: (-before[i], i))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(order) + 1), [before[i] for i in order], label="before", color="#7f8c8d")
    ax.plot(range(1, len(order) + 1), [max(after[i], 0.8) for i in order], label="after", color="#2e86c1")
    ax.axhline(t, color="#c0392b", linestyle="--", label=f"t = {t}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entry (by matches before, head to tail)")
    ax.set_ylabel("matched samples")
    ax.legend()
    save_figure(fig, path)


# -- dedup ---------------------------------------------------------------------------------------------
def content_of(sample: dict, modality: str) -> bytes | None:
    for ext in MODALITIES[modality].extensions:
        if ext in sample:
            return sample[ext]
    return None


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


# -- pollute: known problems planted into a clean set, to measure the above ----------------------------
def nudge_image(content: bytes) -> bytes:
    """The same picture, not the same bytes: 4% brighter, re-encoded in its format."""
    from PIL import Image, ImageEnhance

    img = Image.open(io.BytesIO(content))
    fmt = img.format or "PNG"
    buf = io.BytesIO()
    ImageEnhance.Brightness(img.convert("RGB")).enhance(1.04).save(buf, format=fmt)
    return buf.getvalue()


def pollute(
    src: str,
    dst: str | Path,
    *,
    against: str | None = None,
    mismatch: float = 0.2,
    duplicates: float = 0.05,
    near_duplicates: float = 0.05,
    leaks: int = 20,
    shard_size: int = 400,
    seed: int = 0,
) -> dict[str, Any]:
    """A copy of `src` with planted problems, listed in DST/planted.json: captions swapped for another
    label's (`mismatch` of the captioned samples), exact copies and near copies (the image nudged) of
    other samples, and `leaks` samples of the `against` set. Needs a `json` label on each sample."""
    from contrastive.data.shards import ShardWriter

    rng = random.Random(seed)
    shards = source_shards(src)
    samples = [s for shard in shards for s in iter_tar_samples(shard.path)]
    out = prepare_output(src, dst)
    label = [json.loads(s["json"])["label"] if "json" in s else None for s in samples]
    captioned = [i for i, s in enumerate(samples) if caption_of(s) is not None and label[i] is not None]
    swapped = set(rng.sample(captioned, int(mismatch * len(captioned))))
    planted: dict[str, Any] = {"mismatched": [], "duplicates": {}, "near_duplicates": {}, "leaks": {}}
    originals = [dict(s) for s in samples]
    for i in sorted(swapped):
        other = rng.choice([j for j in captioned if label[j] != label[i]])
        samples[i]["txt"] = originals[other]["txt"]
        planted["mismatched"].append(samples[i]["__key__"])
    clean = [i for i in range(len(samples)) if i not in swapped and content_of(samples[i], "image") is not None]
    extra = []
    chosen = rng.sample(clean, int(duplicates * len(samples)) + int(near_duplicates * len(samples)))
    exact, near = chosen[: int(duplicates * len(samples))], chosen[int(duplicates * len(samples)) :]
    for i in exact:
        copy = dict(samples[i], __key__=f"{samples[i]['__key__']}_copy")
        planted["duplicates"][copy["__key__"]] = samples[i]["__key__"]
        extra.append(copy)
    for i in near:
        copy = dict(samples[i], __key__=f"{samples[i]['__key__']}_near")
        for ext in MODALITIES["image"].extensions:
            if ext in copy:
                copy[ext] = nudge_image(copy[ext])
        planted["near_duplicates"][copy["__key__"]] = samples[i]["__key__"]
        extra.append(copy)
    if against and leaks:
        theirs = [s for shard in source_shards(against) for s in iter_tar_samples(shard.path)]
        for s in rng.sample(theirs, min(leaks, len(theirs))):
            copy = dict(s, __key__=f"leak_{s['__key__']}")
            planted["leaks"][copy["__key__"]] = s["__key__"]
            extra.append(copy)
    for copy in extra:
        samples.insert(rng.randrange(len(samples) + 1), copy)
    with ShardWriter(out, prefix="polluted", max_count=shard_size) as writer:
        writer.write_all(samples)
    planted["samples"] = len(samples)
    (out / "planted.json").write_text(json.dumps(planted, indent=1, sort_keys=True) + "\n")
    (out / REPORT).write_text(json.dumps({"command": "pollute", "source": redact(src)}, indent=1) + "\n")
    return planted
