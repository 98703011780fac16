"""The loader through real tar shards and real DataLoader workers: fixed-size dict batches with
masks, equal batch counts on every rank and worker, every sample exactly once per epoch, bad input
counted, exact resume from a position."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from contrastive.data import DataPosition, ShardDataset, batches, list_shards, load_sources, make_loader
from contrastive.data.shards import count_samples

from datasets import sample, tiny_modalities, write_dataset


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    # 53 samples in shards of 10 (the last one short); some samples lack a modality
    samples = [sample(i, audio=i % 7 != 3, text=i % 11 != 5, image=i % 13 != 8) for i in range(53)]
    return write_dataset(tmp_path_factory.mktemp("ds"), samples, shard_size=10)


def keys_of(batch_list):
    return [k for b in batch_list for k in b["__key__"] if k]


def test_writer_and_sizes(dataset_dir):
    sizes = json.loads((dataset_dir / "sizes.json").read_text())
    assert sizes == {f"part-{i:06d}.tar": (10 if i < 5 else 3) for i in range(6)}
    shards = list_shards(dataset_dir)
    assert [s.samples for s in shards] == [10, 10, 10, 10, 10, 3]
    assert all(count_samples(s.path) == s.samples for s in shards)


def test_batches_are_fixed_size_dicts_with_masks(dataset_dir):
    mods = tiny_modalities()
    ds = ShardDataset(load_sources(str(dataset_dir)), mods, batch_size=8, train=True, num_workers=0)
    out = list(make_loader(ds))
    assert len(out) == len(ds) == 6  # 53 // 8 full batches: training drops the partial one
    for b in out:
        assert b["image"].shape == (8, 3, 32, 32) and b["text"].shape == (8, 16)
        assert b["audio"].shape == (8, 1, 32, mods["audio"].frames)
        assert set(b["mask"]) == {"image", "audio", "text"}
        assert all(b["__key__"])  # full: no padding row
    keys = keys_of(out)
    assert len(keys) == len(set(keys)) == 48
    numbers = [int(k[1:]) for k in keys]
    totals = sum((Counter(b["counts"]) for b in out), Counter())
    assert totals["samples"] == 48
    assert totals["present/audio"] == len([i for i in numbers if i % 7 != 3])
    assert totals["present/text"] == len([i for i in numbers if i % 11 != 5])
    evaluation = ShardDataset(load_sources(str(dataset_dir)), mods, batch_size=8, train=False, num_workers=0)
    assert sorted(keys_of(make_loader(evaluation))) == [f"s{i:05d}" for i in range(53)]  # every one, padded
    # a missing modality is a False in its mask and zeros in its slot
    by_key = {k: (b, j) for b in out for j, k in enumerate(b["__key__"]) if k}
    b, j = by_key[next(k for k in keys if int(k[1:]) % 7 == 3 and int(k[1:]) % 13 != 8)]
    assert not b["mask"]["audio"][j] and b["mask"]["image"][j] and torch.all(b["audio"][j] == 0)


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2), (3, 1)])
def test_every_rank_gets_equal_batches_and_every_sample_once_but_the_dropped(dataset_dir, world, workers):
    mods = tiny_modalities(("image", "text"))
    per_rank = []
    for rank in range(world):
        ds = ShardDataset(
            load_sources(str(dataset_dir)),
            mods,
            batch_size=4,
            train=True,
            seed=3,
            rank=rank,
            world_size=world,
            num_workers=workers,
        )
        per_rank.append(list(make_loader(ds)))
    assert len({len(r) for r in per_rank}) == 1, "every rank must see the same number of batches"
    assert len(per_rank[0]) == len(ds)
    keys = [k for r in per_rank for k in keys_of(r)]
    assert len(keys) == len(set(keys)) == len(ds) * world * 4  # full batches only
    assert 53 - len(keys) < world * workers * 4  # each worker's partial last batch dropped


def test_epochs_reshuffle_deterministically(dataset_dir):
    mods = tiny_modalities(("text",) * 1)
    ds = ShardDataset(load_sources(str(dataset_dir)), {"text": mods["text"]}, batch_size=8, train=True, seed=1)
    first = keys_of(make_loader(ds))
    ds.epoch = 1
    second = keys_of(make_loader(ds))
    ds.epoch = 0
    again = keys_of(make_loader(ds))
    assert first == again and first != second and len(set(second)) == len(second)  # another order, none twice


def test_resume_from_a_position_continues_the_same_sequence(dataset_dir):
    mods = {"text": tiny_modalities(("text",))["text"]}

    def make():
        return ShardDataset(load_sources(str(dataset_dir)), mods, batch_size=4, train=True, seed=5, num_workers=2)

    full_pos = DataPosition()
    stream = batches(make(), full_pos)
    uninterrupted = [next(stream)["__key__"] for _ in range(20)]  # crosses an epoch boundary (12 a epoch)

    pos = DataPosition()
    stream = batches(make(), pos)
    head = [next(stream)["__key__"] for _ in range(9)]
    saved = DataPosition(**vars(pos))
    stream = batches(make(), saved)
    tail = [next(stream)["__key__"] for _ in range(11)]
    assert head + tail == uninterrupted


def test_corrupt_image_is_counted_and_the_rest_of_the_sample_kept(tmp_path):
    samples = [sample(i) for i in range(12)]
    samples[4]["png"] = b"\x89PNG garbage"
    samples[9]["png"] = samples[9]["png"][:40]
    write_dataset(tmp_path, samples, shard_size=5)
    ds = ShardDataset(
        load_sources(str(tmp_path)), tiny_modalities(("image", "text")), batch_size=6, train=False, num_workers=2
    )
    out = list(make_loader(ds))
    totals = sum((Counter(b["counts"]) for b in out), Counter())
    assert totals["bad/image"] == 2
    assert totals["samples"] == 12  # their text is still used
    assert sum(int(b["mask"]["text"].sum()) for b in out) == 12
    assert sum(int(b["mask"]["image"].sum()) for b in out) == 10
