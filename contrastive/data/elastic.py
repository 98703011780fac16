"""An interrupted epoch continued on another layout (other ranks, loader workers or batch size): which
samples it has left, and how the new layout splits them, so that each is still trained exactly once.

An epoch is a sequence of sample positions: the shards in the epoch's order, each one's samples in
order. A layout (R ranks x K workers, B slots a batch) splits the positions it is given into R*K
contiguous spans; each worker shuffles its span in a seeded buffer and cuts it into batches, and rank
r hands out its batch i from its stream i mod K. After b batches on every rank, stream k has handed
out ceil((b - k) / K) batches: the first of those slots of its shuffled span were trained. Replaying
the seeded shuffle on the positions (it reads no data) gives exactly which, and which are left: the
ones still in the shuffle buffer and those not read yet.

The loader's position therefore carries the layouts the epoch already ran under (`plan`: each with
the batches it consumed); the positions they left are the epoch the current layout splits. Memory and
time: ranges of positions, one replayed buffer at a time (a pass over the consumed part's indices).
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Iterator, Mapping, Sequence

import webdataset as wds

from contrastive.data.shards import Shard
from contrastive.data.sources import span

Ranges = list[tuple[int, int]]  # disjoint, increasing [start, end) position ranges
LAYOUT_KEYS = ("world_size", "num_workers", "batch_size")


def count(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def take(ranges: Ranges, lo: int, hi: int) -> Ranges:
    """The positions of ranks lo..hi-1 among `ranges`' positions, as ranges."""
    out, seen = [], 0
    for a, b in ranges:
        n = b - a
        x, y = max(lo, seen), min(hi, seen + n)
        if x < y:
            out.append((a + x - seen, a + y - seen))
        seen += n
        if seen >= hi:
            break
    return out


def positions(ranges: Ranges) -> Iterator[int]:
    for a, b in ranges:
        yield from range(a, b)


def merge(ranges: Sequence[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        elif a < b:
            out.append((a, b))
    return out


class _Counted:
    """An iterator that counts the items taken from it."""

    def __init__(self, items: Iterator[int]):
        self.items, self.read = items, 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> int:
        item = next(self.items)
        self.read += 1
        return item


def worker_batches(total: int, global_workers: int, batch_size: int, *, drop_last: bool) -> int:
    """Batches each worker makes of an epoch of `total` samples. Training (`drop_last`): only full
    ones, as open_clip does; each worker's last, partial batch is dropped (its samples are not
    trained this epoch), so no step at an epoch's end has fewer negatives; where a worker's share is
    under one batch, that one partial batch is kept. Evaluation: every sample, the last batch padded."""
    share = total // global_workers if drop_last else -(-total // global_workers)
    return max(share // batch_size, 1 if total else 0) if drop_last else -(-share // batch_size)


def handed_out(batches: int, stream: int, workers: int) -> int:
    """Batches stream `stream` of `workers` has produced once its rank consumed `batches`."""
    return max(0, (batches - stream + workers - 1) // workers)


def left_after(
    ranges: Ranges, layout: Mapping[str, int], batches: int, *, seed: int, epoch: int, shuffle_buffer: int
) -> Ranges:
    """The positions of `ranges` not yet trained once every rank of `layout` consumed `batches`."""
    workers = layout["num_workers"]
    global_workers = layout["world_size"] * workers
    total, left = count(ranges), []
    per_worker = worker_batches(total, global_workers, layout["batch_size"], drop_last=True)
    for worker in range(global_workers):
        lo, hi = span(total, worker, global_workers)
        mine = take(ranges, lo, hi)
        made = min(handed_out(batches, worker % workers, workers), per_worker)
        trained = min(made * layout["batch_size"], hi - lo)
        if trained == 0:
            left += mine
            continue
        source = _Counted(positions(mine))
        stream: Iterator[int] = source
        if shuffle_buffer:  # the very shuffle ShardDataset.epoch_batches runs, with the same seed
            rng = random.Random(f"samples/{seed}/{epoch}/{worker}")
            stream = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(stream)
        out = set(itertools.islice(stream, trained))
        left += [(p, p + 1) for p in positions(take(mine, 0, source.read)) if p not in out]
        left += take(mine, source.read, hi - lo)
    return merge(left)


def trained_count(total: int, layout: Mapping[str, int], batches: int) -> int:
    """Slots trained of an epoch of `total` once every rank of `layout` consumed `batches`."""
    workers = layout["num_workers"]
    global_workers = layout["world_size"] * workers
    per_worker = worker_batches(total, global_workers, layout["batch_size"], drop_last=True)
    trained = 0
    for worker in range(global_workers):
        lo, hi = span(total, worker, global_workers)
        made = min(handed_out(batches, worker % workers, workers), per_worker)
        trained += min(made * layout["batch_size"], hi - lo)
    return trained


def remaining(total: int, plan: Sequence[Mapping[str, Any]], *, seed: int, epoch: int, shuffle_buffer: int) -> Ranges:
    """The positions of an epoch of `total` that the layouts of `plan` (in order) left."""
    ranges: Ranges = [(0, total)] if total else []
    for step in plan:
        ranges = left_after(ranges, step, step["batches"], seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer)
    return ranges


def segments(ordered: Sequence[Shard], ranges: Ranges) -> list[tuple[Shard, int, int, frozenset | None]]:
    """The shard segments that hold `ranges`' positions of the epoch (`ordered`: its shard order): one
    per shard, (shard, first index, samples, the indices to deliver where they are not contiguous)."""
    out: list[tuple[Shard, int, int, frozenset | None]] = []
    starts = list(itertools.accumulate((s.samples for s in ordered), initial=0))
    i = 0
    for a, b in ranges:
        while a < b:
            while starts[i + 1] <= a:
                i += 1
            shard, offset = ordered[i], starts[i]
            end = min(b, starts[i + 1])
            first, n = a - offset, end - a
            if out and out[-1][0] is shard:
                _, start, k, keep = out[-1]
                indices = set(keep) if keep is not None else set(range(start, start + k))
                indices.update(range(first, first + n))
                out[-1] = (shard, start, len(indices), frozenset(indices))
            else:
                out.append((shard, first, n, None))
            a = end
    return out
