"""`contrastive-data balance`: MetaCLIP's cap per concept entry, matched in the captions with an
Aho-Corasick automaton (see contrastive/data_tools/curate.py)."""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from contrastive.data.shards import DataError
from contrastive.data.sources import iter_tar_samples
from contrastive.data.storage import basename, redact
from contrastive.data_tools.curate import (
    caption_of,
    copy_kept,
    finish_output,
    map_shards,
    pool,
    prepare_output,
    save_figure,
    source_shards,
    unit,
)

_MATCHER: Any = None


def _build_matcher(entries: tuple[str, ...]) -> None:
    import ahocorasick

    global _MATCHER
    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(entries):
        automaton.add_word(entry, (index, len(entry)))
    automaton.make_automaton()
    _MATCHER = automaton


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
        if drawn(seed, sample["__key__"], found, counts, t):
            after.update(found)
            return True
        return False

    return copy_kept(location, Path(out) / basename(location), keep), after


def drawn(seed: int, key: str, found: set[int], counts: dict[int, int], t: int) -> bool:
    """MetaCLIP's sampling: each matched entry i draws on its own, succeeding with probability
    min(1, t / count_i); the sample stays if any draw succeeds, so with probability
    1 - prod(1 - p_i). Each draw is fixed by (seed, key, entry), whichever worker reads the sample."""
    return any(unit(seed, f"{key}/{i}") < min(1.0, t / counts[i]) for i in sorted(found))


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """MetaCLIP's balancing: count each entry's matches in the captions, then keep a sample if any of
    its entries' draws succeeds, each with probability min(1, t / count) (`drawn`: a tail entry's
    samples all stay, a head entry's are cut to about t, a caption naming several head entries has
    several chances). Samples matching no entry are dropped unless `keep_unmatched`."""
    if t < 1:
        raise DataError("--t: a positive count per entry")
    entries = tuple(read_entries(concepts))
    shards = source_shards(src)
    out = prepare_output(src, dst, overwrite=overwrite)
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
