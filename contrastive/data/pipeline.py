"""The loader: sharded tar files -> equal, fixed-size dict batches on every rank, resumable exactly.

Each epoch, the shards are put in an order seeded by (seed, epoch) and their samples, read as one
stream, are cut into one contiguous span per global worker (rank x DataLoader worker). Spans differ
by at most one sample, every worker yields the same number of batches (the last ones padded with
empty rows), so no rank waits at the end of an epoch and fewer shards than workers is not an error.
Within a worker, samples are shuffled in a buffer seeded by (seed, epoch, worker) and grouped into
batches of `batch_size` slots. The loader's position is (epoch, batches consumed by this rank):
from it, each worker knows how many of its batches to skip, without decoding them, on resume.
"""

from __future__ import annotations

import logging
import math
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import webdataset as wds

from contrastive.data.decode import BatchDecoder
from contrastive.data.shards import DataError, Shard, sample_key
from contrastive.modalities.base import Modality

log = logging.getLogger("contrastive.data")

Segment = tuple[Shard, int, int]  # shard, first sample, number of samples


def iter_tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar file in order: members sharing a key, grouped (`__key__`, ext -> bytes)."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            key, ext = sample_key(member.name)
            if not member.isreg() or key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def read_segments(segments: Sequence[Segment]) -> Iterator[dict[str, Any]]:
    """Exactly `count` slots per segment: the shard's samples, then error slots for any it could not
    deliver (a truncated or unreadable tar, or fewer samples than sizes.json claims)."""
    for shard, start, count in segments:
        delivered, reason = 0, None
        try:
            for index, sample in enumerate(iter_tar_samples(shard.path)):
                if delivered == count:
                    break
                if index >= start:
                    sample["__shard__"] = shard.name
                    yield sample
                    delivered += 1
            if delivered < count:
                reason = "short_shard"
                log.warning("shard %s holds fewer samples than sizes.json says", shard.name)
        except (tarfile.TarError, OSError, EOFError) as e:
            reason = "truncated_shard" if delivered or start else "unreadable_shard"
            log.warning("shard %s: %s after %d samples: %s", shard.name, reason, start + delivered, e)
        for _ in range(count - delivered):
            yield {"__error__": reason, "__shard__": shard.name}


def epoch_order(shards: Sequence[Shard], *, seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def worker_segments(ordered: Sequence[Shard], worker: int, workers: int) -> list[Segment]:
    """The contiguous span of the concatenated sample stream that global worker `worker` reads."""
    total = sum(s.samples for s in ordered)
    lo, hi = worker * total // workers, (worker + 1) * total // workers
    segments, offset = [], 0
    for shard in ordered:
        a, b = max(lo, offset), min(hi, offset + shard.samples)
        if a < b:
            segments.append((shard, a - offset, b - a))
        offset += shard.samples
    return segments


def group_slots(slots: Iterator[Any], *, batch_size: int, batches: int) -> Iterator[list[Any]]:
    """Exactly `batches` groups of `batch_size` slots; None fills what the stream does not."""
    for _ in range(batches):
        group = [next(slots, None) for _ in range(batch_size)]
        yield group


@dataclass
class DataPosition:
    """Where a rank's loader stands: the epoch and how many batches of it this rank has consumed."""

    epoch: int = 0
    batch: int = 0


class ShardDataset(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch (`epoch`), from batch `start_batch` on."""

    def __init__(
        self,
        shards: Sequence[Shard],
        modalities: Mapping[str, Modality],
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ):
        self.shards = list(shards)
        self.total = sum(s.samples for s in self.shards)
        if self.total == 0:
            raise DataError("the dataset holds no samples")
        self.modalities = dict(modalities)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.rank, self.world_size = rank, world_size
        self.loader_workers = num_workers  # DataLoader processes; 0 reads in the training process
        self.num_workers = max(num_workers, 1)  # streams the epoch is split into on this rank
        self.epoch, self.start_batch = 0, 0

    @property
    def global_workers(self) -> int:
        return self.world_size * self.num_workers

    @property
    def batches_per_worker(self) -> int:
        return math.ceil(math.ceil(self.total / self.global_workers) / self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_worker * self.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise DataError(f"dataset built for {self.num_workers} workers runs in {info.num_workers}")
        # DataLoader takes batches from its workers in turn, starting with worker 0: in the epoch's
        # order, batch i comes from stream i % W. A loader resumed at batch `start_batch` starts with
        # stream start_batch % W, so its worker k reads stream (k + start_batch) % W; each stream
        # skips the batches it had already produced, without decoding them.
        W = self.num_workers
        stream = ((info.id if info is not None else 0) + self.start_batch) % W
        skip = (self.start_batch - stream + W - 1) // W
        global_worker = self.rank * W + stream
        ordered = epoch_order(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.train)
        segments = worker_segments(ordered, global_worker, self.global_workers)
        decoder = BatchDecoder(self.modalities, train=self.train, seed=self.seed)
        decoder.epoch = self.epoch
        rng = random.Random(f"samples/{self.seed}/{self.epoch}/{global_worker}")
        pipeline = wds.DataPipeline(
            # this worker's span of the epoch: raw bytes, one slot per sample sizes.json promises
            lambda: read_segments(segments),
            # shuffle samples in a buffer seeded by (seed, epoch, worker)
            *([wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)] if self.shuffle_buffer else []),
            # fixed-size groups of slots, the same number on every worker
            lambda slots: group_slots(iter(slots), batch_size=self.batch_size, batches=self.batches_per_worker),
            # a resumed run skips the groups it already trained on, before any decoding
            lambda groups: (g for i, g in enumerate(groups) if i >= skip),
            # decode, transform and collate into a dict batch with masks and counters
            wds.map(decoder),
        )
        return iter(pipeline)


def make_loader(dataset: ShardDataset, *, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    workers = dataset.loader_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # the dataset batches
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def batches(dataset: ShardDataset, position: DataPosition, *, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Endless batches from `position` on, advancing `position` as each batch is handed out."""
    while True:
        dataset.epoch, dataset.start_batch = position.epoch, position.batch
        for batch in make_loader(dataset, pin_memory=pin_memory):
            position.batch += 1
            yield batch
        position.epoch, position.batch = position.epoch + 1, 0
