"""Curate a dataset before training: score, filter, balance by concept, remove duplicates and leaks.

    contrastive-data score SRC --model EXPORT --out scores/              # each sample's pair cosines
    contrastive-data filter SRC DST --scores scores/ --keep 'image-text>=0.28'   # or --top 70%
    contrastive-data balance SRC DST --concepts entries.txt --t 20000    # MetaCLIP's per-entry cap
    contrastive-data dedup SRC --against EVAL... --model EXPORT --out DST   # duplicates and leaks
    contrastive-data pollute SRC DST --against EVAL                      # plant known problems (to measure)

The commands live in scoring.py (score, filter), balance.py, dedup.py and pollute.py; this module
holds what they share: worker pools, progress, output sets, embeddings. Every command streams over
the shards (local or remote, as training reads them), one shard per task in `--workers` processes,
and never touches its source. Commands that write a set write one shard per
source shard (the same name, the samples kept in their order; a shard left empty is not written),
`sizes.json`, and a JSON report with a PNG beside it; the output is byte-identical whatever the
number of workers: every decision depends on the sample (its key, its bytes, its embedding computed
on one thread), never on which worker saw it. Embeddings (`score`, `dedup --model`) are
`contrastive-embed`'s files under the output, finished shards skipped on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from contrastive.data.shards import SIZES_FILE, DataError, Shard, list_shards, write_shard
from contrastive.data.sources import iter_tar_samples
from contrastive.data.storage import STORAGE_OPTIONS, basename, configure_storage, redact
from contrastive.modalities import MODALITIES

log = logging.getLogger("contrastive.curate")

REPORT = "curation.json"


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


def prepare_output(src: str, dst: str | Path, *, overwrite: bool = False) -> Path:
    """An output directory for a curated copy: never the source, never someone else's shards, and an
    earlier curation's output only with `overwrite`."""
    out = Path(dst)
    if "://" not in src and not src.startswith("pipe:") and out.resolve() == Path(src).resolve():
        raise DataError(f"the output {dst} is the source: curation never modifies its input")
    if out.exists() and any(out.glob("*.tar")):
        if not (out / REPORT).exists():
            raise DataError(f"{dst} holds shards contrastive-data did not write: choose an empty directory")
        if not overwrite:
            made = json.loads((out / REPORT).read_text()).get("command", "contrastive-data")
            raise DataError(f"{dst} holds the output of an earlier `{made}`: choose another directory, or --overwrite")
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
    return copy_kept(location, Path(out) / basename(location), lambda s: s["__key__"] not in drop)


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


def caption_of(sample: dict) -> str | None:
    for ext in MODALITIES["text"].extensions:
        if ext in sample:
            return sample[ext].decode("utf-8", errors="replace").lower()
    return None


def content_of(sample: dict, modality: str) -> bytes | None:
    for ext in MODALITIES[modality].extensions:
        if ext in sample:
            return sample[ext]
    return None
