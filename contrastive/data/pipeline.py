"""The loader: sharded tar files -> equal, fixed-size dict batches on every rank, resumable exactly.

Each epoch, the shards are put in an order seeded by (seed, epoch) and their samples, read as one
stream, are cut into one contiguous span per global worker (rank x DataLoader worker). Spans differ
by at most one sample, every worker yields the same number of batches, so no rank waits at the end
of an epoch and fewer shards than workers is not an error. Training makes full batches only: each
worker's last, partial batch is dropped, as open_clip does (no step with fewer negatives at an
epoch's end; under one batch a worker's share is kept, padded); evaluation pads its last batches.
Within a worker, samples are shuffled in a buffer seeded by (seed, epoch, worker) and grouped into
batches of `batch_size` slots. The loader's position is (epoch, batches consumed by this rank):
from it, each worker knows how many of its batches to skip, without decoding them, on resume.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import webdataset as wds

from contrastive.adapters import stop_loader_workers
from contrastive.data import elastic
from contrastive.data.decode import BatchDecoder
from contrastive.data.settings import DataConfig
from contrastive.data.shards import DataError
from contrastive.data.sources import (
    Source,
    epoch_order,
    exact_slots,
    read_segments,
    resampled_slots,
    span,
    whole_shards,
)
from contrastive.data.storage import STORAGE_OPTIONS, configure_storage
from contrastive.data.tar import LAZY_OVER
from contrastive.modalities.base import Modality
from contrastive.preemption import ignore_in_worker


def group_slots(slots: Iterator[Any], *, batch_size: int, batches: int | None) -> Iterator[list[Any]]:
    """Exactly `batches` groups of `batch_size` slots, None filling what the stream does not; with
    `batches=None`, groups until the stream ends (the last one filled up with None)."""
    made = 0
    while batches is None or made < batches:
        group = [next(slots, None) for _ in range(batch_size)]
        if batches is None and all(slot is None for slot in group):
            return
        made += 1
        yield group


@dataclass
class DataPosition:
    """Where a rank's loader stands: the epoch and how many batches of it this rank has consumed;
    `plan`: the layouts this epoch ran under before (each with the batches it consumed), when a run was
    resumed on another layout (see contrastive.data.elastic)."""

    epoch: int = 0
    batch: int = 0
    plan: list = field(default_factory=list)


class ShardDataset(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch (`epoch`), from batch `start_batch` on.

    `resampled=False`: each epoch reads every sample of every source once. `resampled=True`: each
    (virtual) epoch draws `epoch_samples` samples, sources mixed by weight, shards drawn with
    replacement, as webdataset's resampled shards but with a fixed, seeded quota per worker."""

    def __init__(
        self,
        sources: Sequence[Source],
        modalities: Mapping[str, Modality],
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = DataConfig.shuffle_buffer,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        resampled: bool = False,
        epoch_samples: int = 0,
        modality_dropout: Mapping[str, float] | None = None,
        prefetch_bytes: int = DataConfig.prefetch_mb << 20,
        max_member_bytes: int = DataConfig.max_member_mb << 20,
    ):
        self.sources = list(sources)
        # an evaluation set whose shards are not all counted: each shard read whole by one worker,
        # counted as it streams; ranks then make different numbers of batches (see embed_dataset)
        self.streamed = not train and any(s.samples is None for src in self.sources for s in src.shards)
        self.resampled = resampled
        if not resampled and any(s.weight != 1.0 for s in self.sources):
            raise DataError("data: dataset weights mix resampled shards; set data.resampled=true to use them")
        self.total = epoch_samples if resampled and epoch_samples else sum(s.samples for s in self.sources)
        if self.total == 0 and not self.streamed:
            raise DataError("the dataset holds no samples")
        self.modalities = dict(modalities)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.modality_dropout = dict(modality_dropout or {}) if train else {}
        self.rank, self.world_size = rank, world_size
        self.loader_workers = num_workers  # DataLoader processes; 0 reads in the training process
        self.num_workers = max(num_workers, 1)  # streams the epoch is split into on this rank
        self.epoch, self.start_batch = 0, 0
        self.plan: list[dict[str, int]] = []  # the layouts epoch `self.epoch` ran under before this one
        self.endless = False  # True: epoch after epoch from (epoch, start_batch), for training
        self.prefetch_bytes = prefetch_bytes
        self.max_member_bytes = max_member_bytes
        self.storage_options = dict(STORAGE_OPTIONS)  # what a spawned worker reads remote shards with

    @property
    def global_workers(self) -> int:
        return self.world_size * self.num_workers

    def epoch_total(self, epoch: int) -> int:
        """Samples of `epoch` this layout reads: all, or what the layouts before it left (`plan`)."""
        if epoch != self.epoch or not self.plan:
            return self.total
        if self.resampled:  # draws, not samples: what is left is a number
            total = self.total
            for step in self.plan:
                total -= elastic.trained_count(total, step, step["batches"])
            return total
        return elastic.count(self._remaining())

    def _remaining(self) -> elastic.Ranges:
        key = (self.epoch, repr(self.plan))
        if getattr(self, "_remaining_key", None) != key:
            self._remaining_ranges = elastic.remaining(
                self.total, self.plan, seed=self.seed, epoch=self.epoch, shuffle_buffer=self.shuffle_buffer
            )
            self._remaining_key = key
        return self._remaining_ranges

    def batches_per_worker(self, epoch: int) -> int:
        """Training: full batches only (a worker's last, partial one is dropped; see
        elastic.worker_batches); evaluation: every sample."""
        return elastic.worker_batches(
            self.epoch_total(epoch), self.global_workers, self.batch_size, drop_last=self.train
        )

    def epoch_length(self, epoch: int) -> int:
        """Batches of `epoch` on this rank (the same on every rank)."""
        return self.batches_per_worker(epoch) * self.num_workers

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if self.streamed:
            raise TypeError("an evaluation set read whole, counted as it streams, has no length before it is read")
        return self.epoch_length(self.epoch)

    def stream_position(self, batch: int) -> dict[int, int]:
        """Batches each of this rank's streams has produced once the rank has consumed `batch`."""
        return {w: elastic.handed_out(batch, w, self.num_workers) for w in range(self.num_workers)}

    def layout(self) -> dict[str, int]:
        """What an exact resume without carrying the position over needs unchanged."""
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size}

    def fingerprint(self) -> str:
        """The data's identity for a resume: the shards' names and counts (not where they are: the same
        shards may be read from another place on another cluster)."""
        names = [(s.name, s.samples) for src in self.sources for s in src.shards]
        return hashlib.sha256(json.dumps([self.resampled, self.total, names]).encode()).hexdigest()[:16]

    def carry_over(self, position: DataPosition, saved: Mapping[str, int]) -> DataPosition:
        """The position of a run saved under the layout `saved` (other ranks, workers or batch size),
        continued under this one: the rest of its epoch, each sample of it once (see
        contrastive.data.elastic), then whole epochs as ever."""
        if position.batch == 0:
            return DataPosition(position.epoch, 0, list(position.plan))
        carried = DataPosition(position.epoch, 0, [*position.plan, {**saved, "batches": position.batch}])
        self.epoch, self.plan = carried.epoch, carried.plan
        if self.epoch_total(carried.epoch) == 0:  # nothing but padding was left of it
            return DataPosition(position.epoch + 1, 0, [])
        return carried

    def slots(self, stream: int, epoch: int) -> Iterator[dict[str, Any]]:
        worker = self.rank * self.num_workers + stream
        # a large member of a local shard is read when decoded, if a modality reads it by parts
        lazy_over = LAZY_OVER if any(m.reads_spans for m in self.modalities.values()) else 0
        read = {"prefetch_bytes": self.prefetch_bytes, "max_member": self.max_member_bytes, "lazy_over": lazy_over}
        if self.streamed:
            return whole_shards(self.sources, worker=worker, workers=self.global_workers, **read)
        total = self.epoch_total(epoch)
        lo, hi = span(total, worker, self.global_workers)
        if self.resampled:
            depth = f"/{len(self.plan)}" if epoch == self.epoch and self.plan else ""  # fresh draws for the rest
            rng = random.Random(f"resampled/{self.seed}/{epoch}/{worker}{depth}")
            return resampled_slots(self.sources, rng=rng, count=hi - lo, **read)
        if epoch == self.epoch and self.plan:
            shards = [s for src in self.sources for s in src.shards]
            ordered = epoch_order(shards, seed=self.seed, epoch=epoch, shuffle=self.train)
            mine = elastic.segments(ordered, elastic.take(self._remaining(), lo, hi))
            return read_segments(mine, **read)
        order = {"seed": self.seed, "epoch": epoch, "shuffle": self.train}
        return exact_slots(self.sources, **order, worker=worker, workers=self.global_workers, **read)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise DataError(f"dataset built for {self.num_workers} workers runs in {info.num_workers}")
        configure_storage(self.storage_options)
        # DataLoader takes batches from its workers in turn, starting with worker 0: in the epoch's
        # order, batch i comes from stream i % W. A loader resumed at batch `start_batch` starts with
        # stream start_batch % W, so its worker k reads stream (k + start_batch) % W; each stream
        # skips the batches it had already produced, without decoding them. Every stream makes the
        # same number of batches an epoch, so the rotation holds across epochs too.
        stream = ((info.id if info is not None else 0) + self.start_batch) % self.num_workers
        skip = self.stream_position(self.start_batch)[stream]
        epochs = itertools.count(self.epoch) if self.endless else [self.epoch]
        for epoch in epochs:
            yield from self.epoch_batches(epoch, stream, skip if epoch == self.epoch else 0)

    def epoch_batches(self, epoch: int, stream: int, skip: int) -> Iterator[dict[str, Any]]:
        """One stream's batches of one epoch, from its batch `skip` on."""
        # evaluation reads every alternative of a value (each caption line of an image's captions)
        decoder = BatchDecoder(
            self.modalities,
            train=self.train,
            seed=self.seed,
            epoch=epoch,
            modality_dropout=self.modality_dropout,
            eval_inputs=not self.train,
        )
        rng = random.Random(f"samples/{self.seed}/{epoch}/{self.rank * self.num_workers + stream}")
        pipeline = wds.DataPipeline(
            # this worker's raw samples: bytes only, exactly its quota of slots
            lambda: self.slots(stream, epoch),
            # shuffle samples in a buffer seeded by (seed, epoch, worker)
            *([wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)] if self.shuffle_buffer else []),
            # fixed-size groups of slots, the same number on every worker
            lambda slots: group_slots(
                iter(slots),
                batch_size=self.batch_size,
                batches=None if self.streamed else self.batches_per_worker(epoch),
            ),
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
        worker_init_fn=ignore_in_worker if workers else None,
    )


@contextmanager
def loader_batches(dataset: ShardDataset, *, pin_memory: bool = False) -> Iterator[Iterator[dict[str, Any]]]:
    """The DataLoader's batches; its worker processes are stopped on leaving, also when an exception
    (a worker's included) ends the loop. They ignore SIGTERM (see preemption.ignore_in_worker), so the
    interpreter's exit could not stop them: it would wait for them forever."""
    iterator = iter(make_loader(dataset, pin_memory=pin_memory))
    try:
        yield iterator
    finally:
        stop_loader_workers(iterator)


def batches(dataset: ShardDataset, position: DataPosition, *, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Endless batches from `position` on, advancing `position` as each batch is handed out. One
    DataLoader streams epoch after epoch, so its workers are not restarted at each epoch. Close the
    generator (or let it end) to stop the workers."""
    dataset.epoch, dataset.start_batch, dataset.endless = position.epoch, position.batch, True
    dataset.plan = list(position.plan)
    with loader_batches(dataset, pin_memory=pin_memory) as stream:
        for batch in stream:
            position.batch += 1
            if position.batch == dataset.epoch_length(position.epoch):
                position.epoch, position.batch, position.plan = position.epoch + 1, 0, []
            yield batch
