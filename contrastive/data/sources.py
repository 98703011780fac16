"""Where a worker's raw samples come from: its span of an exact epoch, or a weighted, resampled mix.

Both sources yield exactly the number of slots the worker was given, so every worker of every rank
makes the same number of batches. A slot is a raw sample (`__key__`, `__shard__`, ext -> bytes) or
an error slot (`__error__`) standing for a sample a broken shard could not deliver.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from contrastive.data.prefetch import prefetched
from contrastive.data.shards import DataError, Shard, list_shards, sample_key
from contrastive.data.storage import ObjectChanged, open_shard
from contrastive.data.tar import MAX_MEMBER, iter_tar_members

MAX_RESTARTS = 2  # reads of a shard from its start again, when its object changes under the reader

log = logging.getLogger("contrastive.data")

# shard, first sample, number of samples, and where these are not contiguous, the sample indices to
# deliver (an epoch continued on another layout: see contrastive.data.elastic)
Segment = tuple[Shard, int, int, Optional[frozenset]]


@dataclass(frozen=True)
class Source:
    """One dataset directory and its mixing weight (used when shards are resampled)."""

    path: str
    shards: tuple[Shard, ...]
    weight: float = 1.0

    @property
    def samples(self) -> int:
        """The counted samples (a shard left uncounted adds none)."""
        return sum(s.samples or 0 for s in self.shards)


def load_sources(spec: Any, *, num_samples: int = 0, count: bool = True) -> list[Source]:
    """`location` | [location, ...] | [{path: location, weight: ...}, ...] -> sources with their shards.
    A location is a directory, a URL, a brace list or pipe:COMMAND (see contrastive.data.storage);
    `num_samples` (data.train_num_samples) stands in for missing sizes.json, spread over the shards;
    with `count=False`, shards sizes.json does not list are left uncounted (an evaluation set)."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    sources = []
    for item in items:
        path, weight = (item, 1.0) if isinstance(item, str) else (item["path"], float(item.get("weight", 1.0)))
        if weight <= 0:
            raise DataError(f"data: weight of {path} must be positive, got {weight}")
        share = num_samples if len(items) == 1 else 0
        sources.append(Source(str(path), tuple(list_shards(path, num_samples=share, count=count)), weight))
    if not sources:
        raise DataError("data: no dataset given")
    return sources


def iter_tar_samples(source: Any, *, max_member: int = MAX_MEMBER, lazy_over: int = 0) -> Iterator[dict[str, Any]]:
    """Samples of one tar in order (a location or an open stream): members sharing a key, grouped
    (`__key__`, ext -> bytes, or a tar.Span for a member over `lazy_over` bytes of a local file)."""
    current: dict[str, Any] | None = None
    for name, content in iter_tar_members(source, max_member=max_member, lazy_over=lazy_over):
        key, ext = sample_key(name)
        if key is None:
            continue
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext] = content
    if current is not None:
        yield current


def read_segments(
    segments: Sequence[Segment],
    *,
    prefetch_bytes: int = 64 << 20,
    max_member: int = MAX_MEMBER,
    lazy_over: int = 0,
) -> Iterator[dict[str, Any]]:
    """Exactly `count` slots per segment (count None: every sample the shard holds, and one error slot
    if it breaks): the shard's samples (from `start`, those in `keep` where given), then error slots
    for any it could not deliver (a truncated or unreadable tar, or fewer samples than sizes.json
    claims). A segment that ends at its shard's end checks that nothing follows: samples beyond sizes.json's count are
    reported on the segment's last slot (`__extra__`) rather than silently never read. Remote shards
    are streamed, the next ones read ahead (at most `prefetch_bytes`); the retries their reading took
    are reported on the next slot (`__retries__`). No member larger than `max_member` is read: a
    header claiming one makes its shard broken (see contrastive.data.tar); one over `lazy_over` in a
    local shard is a tar.Span, read when it is decoded."""
    retries: deque = deque()  # one entry per retry, appended by the reading thread
    streams = prefetched(
        [segment[0].path for segment in segments], prefetch_bytes=prefetch_bytes, on_retry=lambda: retries.append(1)
    )

    def tagged(slot: dict[str, Any]) -> dict[str, Any]:
        if retries:
            slot["__retries__"] = slot.get("__retries__", 0) + sum(retries.popleft() for _ in range(len(retries)))
        return slot

    for segment, (_, stream) in zip(segments, streams):
        for slot in segment_slots(segment, stream, retries, max_member=max_member, lazy_over=lazy_over):
            yield tagged(slot)


def segment_slots(
    segment: Segment, stream: Any, retries: deque, *, max_member: int, lazy_over: int = 0
) -> Iterator[dict[str, Any]]:
    """The slots of one segment (see read_segments) from `stream`, its shard's bytes. A shard whose
    object changed while it was read (storage.ObjectChanged) is read again from its first byte, the
    samples parsed so far skipped: whole samples of the new version, never two versions' bytes joined."""
    shard, start, count, keep = segment
    end = max(keep) + 1 if keep else start + count if count is not None else None
    delivered, reason, extra = 0, None, 0
    last = None
    seen, restarts = 0, 0  # samples parsed (read again after a restart, not delivered again)
    while True:
        try:
            with stream:
                for index, sample in enumerate(iter_tar_samples(stream, max_member=max_member, lazy_over=lazy_over)):
                    if index < seen:
                        continue
                    seen = index + 1
                    if count is not None and delivered == count:
                        if end < shard.samples:
                            break
                        extra += 1  # sizes.json says the shard ends here, yet it goes on
                        continue
                    if index >= start and (keep is None or index in keep):
                        sample["__shard__"] = shard.name
                        if last is not None:
                            yield last
                        last, delivered = sample, delivered + 1
            if count is not None and delivered < count:
                reason = "short_shard"
                log.warning("shard %s holds fewer samples than sizes.json says (%d)", shard.name, shard.samples)
        except ObjectChanged as e:
            if restarts < MAX_RESTARTS:
                restarts += 1
                log.warning(
                    "shard %s: %s; read again from its start, the first %d samples skipped", shard.name, e, seen
                )
                stream = open_shard(shard.path, on_retry=lambda: retries.append(1))
                continue
            reason = "changed_shard"
            log.warning("shard %s: %s after %d samples: %s", shard.name, reason, start + delivered, e)
        except (tarfile.TarError, OSError, EOFError) as e:
            reason = "truncated_shard" if delivered or start else "unreadable_shard"
            log.warning("shard %s: %s after %d samples: %s", shard.name, reason, start + delivered, e)
        break
    if extra:
        log.warning("shard %s holds %d samples more than sizes.json says; they are not read", shard.name, extra)
    if last is not None:
        if extra:
            last["__extra__"] = extra
        if restarts:
            last["__restarts__"] = restarts
        yield last
    for _ in range(count - delivered if count is not None else int(reason is not None)):
        yield {"__error__": reason, "__shard__": shard.name}


def whole_shards(sources: Sequence[Source], *, worker: int, workers: int, **read: Any) -> Iterator[dict[str, Any]]:
    """Every sample of every worker-th shard (from this worker's index on), counted as it is read: an
    evaluation set without sizes.json, each shard read by one worker of one rank, once."""
    shards = [s for src in sources for s in src.shards]
    return read_segments([(s, 0, None, None) for s in shards[worker::workers]], **read)


def epoch_order(shards: Sequence[Shard], *, seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def span(total: int, worker: int, workers: int) -> tuple[int, int]:
    """[lo, hi) of `total` items for `worker` of `workers`: contiguous, sizes differing by at most 1."""
    return worker * total // workers, (worker + 1) * total // workers


def worker_segments(ordered: Sequence[Shard], worker: int, workers: int) -> list[Segment]:
    """The contiguous span of the concatenated sample stream that global worker `worker` reads."""
    lo, hi = span(sum(s.samples for s in ordered), worker, workers)
    segments, offset = [], 0
    for shard in ordered:
        a, b = max(lo, offset), min(hi, offset + shard.samples)
        if a < b:
            segments.append((shard, a - offset, b - a, None))
        offset += shard.samples
    return segments


def exact_slots(
    sources: Sequence[Source],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    worker: int,
    workers: int,
    **read: Any,
) -> Iterator[dict[str, Any]]:
    """One pass over every sample of every source, this worker's span of it (`read`: read_segments')."""
    shards = [s for src in sources for s in src.shards]
    ordered = epoch_order(shards, seed=seed, epoch=epoch, shuffle=shuffle)
    return read_segments(worker_segments(ordered, worker, workers), **read)


def resampled_slots(
    sources: Sequence[Source],
    *,
    rng: random.Random,
    count: int,
    **read: Any,
) -> Iterator[dict[str, Any]]:
    """`count` slots, each from a source drawn by weight; within a source, shards are drawn with
    replacement (in proportion to their sample counts) and read to their end (`read`: read_segments')."""
    weights = [s.weight for s in sources]
    open_shards: dict[int, Iterator[dict[str, Any]]] = {}
    for _ in range(count):
        i = rng.choices(range(len(sources)), weights=weights)[0]
        while True:
            if i not in open_shards:
                shards = [s for s in sources[i].shards if s.samples > 0]
                if not shards:
                    raise DataError(f"data: {sources[i].path} holds no samples")
                shard = rng.choices(shards, weights=[s.samples for s in shards])[0]
                open_shards[i] = read_segments([(shard, 0, shard.samples, None)], **read)
            slot = next(open_shards[i], None)
            if slot is not None:
                yield slot
                break
            del open_shards[i]
