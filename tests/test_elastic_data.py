"""An epoch stopped under one layout (ranks x loader workers x batch size) and continued under another
trains each of its samples once at most, through the real loader (DataLoader workers, shuffle buffer,
shard order): every one of them except the last partial batch of each worker of the layout that ends
the epoch, which training drops (as open_clip does: no step with fewer negatives). The epochs after
it are whole ones under the same rule. Also twice in a row, and with a remainder under one batch."""

from __future__ import annotations

from collections import Counter

import pytest

from contrastive.data import DataPosition, ShardDataset, batches, load_sources
from contrastive.data.elastic import left_after, merge, remaining, take

from datasets import sample, tiny_modalities, write_dataset

TOTAL = 53


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"), [sample(i) for i in range(TOTAL)], shard_size=10)


@pytest.fixture(scope="module")
def mods():
    return tiny_modalities(("text",))


def layout(world, workers, batch):
    return {"world_size": world, "num_workers": workers, "batch_size": batch}


def once_but_the_dropped(keys: list[str], total: int, lay) -> None:
    """No key twice; what is missing is each worker's dropped partial batch, under one batch a worker."""
    assert max(Counter(keys).values()) == 1
    workers = lay["world_size"] * lay["num_workers"]
    dropped = total - len(keys)
    assert 0 <= dropped < workers * lay["batch_size"], (dropped, lay)


def run(dataset_dir, mods, lay, position: DataPosition, steps: int) -> tuple[list[str], DataPosition]:
    """`steps` batches on every rank of `lay` from `position`: the keys trained, and the position after."""
    keys, after = [], None
    for rank in range(lay["world_size"]):
        ds = ShardDataset(
            load_sources(str(dataset_dir)),
            mods,
            batch_size=lay["batch_size"],
            train=True,
            seed=7,
            shuffle_buffer=8,
            rank=rank,
            world_size=lay["world_size"],
            num_workers=lay["num_workers"],
        )
        pos = DataPosition(position.epoch, position.batch, list(position.plan))
        stream = batches(ds, pos)
        for _ in range(steps):
            keys += [k for k in next(stream)["__key__"] if k]
        stream.close()
        after = after or pos
        assert (pos.epoch, pos.batch, pos.plan) == (after.epoch, after.batch, after.plan)
    return keys, after


def carried(dataset_dir, mods, saved_layout, position, new_layout):
    ds = ShardDataset(
        load_sources(str(dataset_dir)),
        mods,
        batch_size=new_layout["batch_size"],
        train=True,
        seed=7,
        shuffle_buffer=8,
        world_size=new_layout["world_size"],
        num_workers=new_layout["num_workers"],
    )
    return ds.carry_over(position, saved_layout), ds


@pytest.mark.parametrize(
    "before,after,stop",
    [
        (layout(2, 2, 4), layout(1, 2, 8), 3),  # 2 ranks -> 1, the global batch kept
        (layout(1, 2, 8), layout(2, 2, 4), 3),  # 1 rank -> 2
        (layout(3, 1, 3), layout(2, 2, 2), 4),  # other workers and batch too
    ],
)
def test_the_rest_of_the_epoch_once_on_another_layout(dataset_dir, mods, before, after, stop):
    head, pos = run(dataset_dir, mods, before, DataPosition(), stop)
    assert pos.epoch == 0 and pos.batch == stop
    new, ds = carried(dataset_dir, mods, before, pos, after)
    assert new.plan == [{**before, "batches": stop}] and new.batch == 0
    rest_len = ds.epoch_length(0)
    rest, end = run(dataset_dir, mods, after, new, rest_len)
    assert end.epoch == 1 and end.batch == 0 and end.plan == []  # the epoch ends with its rest
    assert len(head) == stop * before["world_size"] * before["batch_size"] and len(set(head)) == len(head)
    once_but_the_dropped(head + rest, TOTAL, after)
    assert ds.epoch_total(0) == TOTAL - len(head)
    # then whole epochs, in the new layout
    next_epoch, _ = run(dataset_dir, mods, after, end, ds.epoch_length(1))
    once_but_the_dropped(next_epoch, TOTAL, after)


def test_carried_over_twice_and_resumed_in_between(dataset_dir, mods):
    a, b, c = layout(2, 2, 4), layout(1, 1, 5), layout(3, 2, 2)
    first, pos = run(dataset_dir, mods, a, DataPosition(), 2)
    pos, _ = carried(dataset_dir, mods, a, pos, b)
    second, pos = run(dataset_dir, mods, b, pos, 2)
    # stopped and resumed on the same layout: the position (with its plan) is kept as it is
    third, pos = run(dataset_dir, mods, b, pos, 1)
    assert len(pos.plan) == 1 and pos.batch == 3
    pos, ds = carried(dataset_dir, mods, b, pos, c)
    assert len(pos.plan) == 2
    rest, end = run(dataset_dir, mods, c, pos, ds.epoch_length(0))
    assert end.epoch == 1
    once_but_the_dropped(first + second + third + rest, TOTAL, c)


def test_a_remainder_under_one_batch_is_dropped_and_the_next_epoch_begins(dataset_dir, mods):
    keys, pos = run(dataset_dir, mods, layout(1, 1, 50), DataPosition(), 1)  # 53 samples: 50 trained, 3 dropped
    assert len(keys) == len(set(keys)) == 50 and (pos.epoch, pos.batch, pos.plan) == (1, 0, [])
    # a worker's share under one batch is still trained, in one padded batch
    keys, pos = run(dataset_dir, mods, layout(2, 1, 30), DataPosition(), 1)
    assert sorted(keys) == [f"s{i:05d}" for i in range(TOTAL)] and pos.epoch == 1
    new, _ = carried(dataset_dir, mods, layout(1, 1, 53), DataPosition(0, 1), layout(2, 1, 4))
    assert (new.epoch, new.batch, new.plan) == (1, 0, [])  # a finished epoch leaves nothing to carry


def test_ranges():
    assert take([(0, 3), (10, 20)], 2, 6) == [(2, 3), (10, 13)]
    assert merge([(5, 6), (0, 2), (2, 4), (6, 9)]) == [(0, 4), (5, 9)]
    # without a shuffle buffer the trained slots are each span's first ones
    left = left_after([(0, 20)], layout(2, 1, 3), 2, seed=0, epoch=0, shuffle_buffer=0)
    assert left == [(6, 10), (16, 20)]
    assert remaining(20, [{**layout(2, 1, 3), "batches": 2}], seed=0, epoch=0, shuffle_buffer=0) == left
