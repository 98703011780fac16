"""Checks that stop a run early with a message that says what to change: the preflight before the
first step, and the bad-input fraction while training."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Mapping, Sequence

from contrastive.data.decode import BAD_SHARD, NOT_LOST, broken_shards
from contrastive.data.shards import DataError
from contrastive.data.sources import Source, iter_tar_samples
from contrastive.data.storage import permanent, redact
from contrastive.modalities.base import Modality

log = logging.getLogger("contrastive.data")

SHARED_SHARD_WARNING_BATCHES = 10  # batches per worker from which too few shards is worth a warning


def preflight(
    sources: Sequence[Source],
    modalities: Mapping[str, Modality],
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    probe_samples: int = 200,
    what: str = "data.train",
    train: bool = True,
) -> dict[str, int]:
    """Before the first step: sample counts against the global batch, shards against ranks x
    workers, and every configured modality present in the training data (an eval set needs one of
    them: an image classification set holds no audio). Raises DataError or warns."""
    shards = [s for src in sources for s in src.shards]
    total = sum(s.samples for s in shards)
    workers = world_size * max(num_workers, 1)
    paths = ", ".join(redact(src.path) for src in sources)
    if total == 0:
        raise DataError(f"{what}: {paths} holds no samples")
    if train and total < workers * batch_size:
        log.warning(
            "%s: %d samples fill less than one batch per worker (%d ranks x %d workers x batch %d): "
            "most rows of every batch are padding; lower data.batch_size or data.num_workers",
            what,
            total,
            world_size,
            max(num_workers, 1),
            batch_size,
        )
    # Workers sharing a shard each read past the others' parts of it: worth a word only when the
    # data is big enough for that to show (a small eval set read by two workers is not).
    if len(shards) < workers and total > SHARED_SHARD_WARNING_BATCHES * workers * batch_size:
        log.warning(
            "%s: %d shards for %d ranks x workers: workers read parts of the same shards (correct, "
            "but each skips its share of a shard's bytes); more shards than ranks x workers read faster",
            what,
            len(shards),
            workers,
        )
    seen: Counter = Counter()
    probed, failures = 0, []
    probe = shards[: max(1, min(len(shards), 8))]
    for shard in probe:
        try:
            for sample in itertools.islice(iter_tar_samples(shard.path), probe_samples):
                probed += 1
                for name, m in modalities.items():
                    seen[name] += any(ext in sample for ext in m.extensions)
        except Exception as e:  # noqa: BLE001 - a broken shard is the loader's to count, unless it is a wrong place
            if permanent(e) or (isinstance(e, OSError) and not probed):
                # a wrong bucket, path or credential, or storage that fails before anything was read
                raise DataError(f"{what}: cannot read {redact(shard.path)}: {type(e).__name__}: {e}") from None
            failures.append(f"{redact(shard.path)}: {type(e).__name__}: {e}")
            log.warning("%s: preflight could not read %s: %s", what, redact(shard.path), e)
        if probed >= probe_samples:
            break
    if failures and not probed:
        raise DataError(f"{what}: none of the first {len(failures)} shards could be read: " + "; ".join(failures))
    missing = [name for name in modalities if probed and seen[name] == 0]
    if missing and (train or len(missing) == len(modalities)):
        wanted = {n: list(modalities[n].extensions) for n in missing}
        raise DataError(
            f"{what}: configured modalities {missing} appear in none of the first {probed} samples of {paths} "
            f"(looked for extensions {wanted}). Remove them from `modalities` or point the data elsewhere."
        )
    log.info(
        "%s: %d samples in %d shards, %d ranks x %d workers; modality coverage in the first %d samples: %s",
        what,
        total,
        len(shards),
        world_size,
        max(num_workers, 1),
        probed,
        ", ".join(f"{n} {seen[n] / max(probed, 1):.0%}" for n in modalities),
    )
    return {"samples": total, "shards": len(shards)}


def check_bad_fraction(counts: Mapping[str, int], *, max_fraction: float, min_slots: int) -> None:
    """Raises DataError when more than `max_fraction` of the samples read so far (once at least
    `min_slots` were read) lost something to bad input, naming the shards with the most."""
    slots = counts.get("slots", 0)
    bad = counts.get("bad_samples", 0)
    if slots < min_slots or bad <= max_fraction * slots:
        return
    worst = sorted(((v, k[len(BAD_SHARD) :]) for k, v in counts.items() if k.startswith(BAD_SHARD)), reverse=True)[:5]
    kinds = {k: v for k, v in counts.items() if k.startswith("bad/") and k not in NOT_LOST}
    raise DataError(
        f"{bad} of {slots} samples read ({bad / slots:.1%}) were bad, above data.max_bad_fraction={max_fraction}. "
        f"By kind: {kinds}. Worst shards: "
        + ", ".join(f"{name} ({n})" for n, name in worst)
        + ". Check them with `contrastive-data verify`, or raise data.max_bad_fraction."
    )


def summarize(counts: Mapping[str, int], skipped_steps: int) -> None:
    """The run's last word on its data: samples trained on, bad input, broken shards, skipped steps."""
    bad = {k: v for k, v in counts.items() if k.startswith("bad/")}
    refused = {k.removeprefix("refused/"): v for k, v in counts.items() if k.startswith("refused/")}
    broken = broken_shards(counts)
    log.info(
        "data: %d samples trained on; bad input skipped and counted: %s%s; broken shards: %s; steps skipped "
        "for non-finite values: %d",
        counts.get("samples", 0),
        bad or "none",
        f" (over the decode budget, by kind: {refused})" if refused else "",
        f"{len(broken)} ({', '.join(broken)})" if broken else "none",
        skipped_steps,
    )
