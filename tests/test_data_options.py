"""Loader options: weighted mixing of resampled datasets, virtual epochs, modality dropout, the
preflight, and the bad-fraction stop through the CLI."""

from __future__ import annotations

from collections import Counter

import pytest

from contrastive.data import DataError, ShardDataset, load_sources, make_loader
from contrastive.data.checks import preflight

from conftest import run_cli, tiny_overrides
from datasets import sample, tiny_modalities, write_dataset


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a = write_dataset(root / "a", [dict(sample(i, audio=False), __key__=f"a{i:04d}") for i in range(40)], shard_size=10)
    b = write_dataset(root / "b", [dict(sample(i, audio=False), __key__=f"b{i:04d}") for i in range(10)], shard_size=5)
    return a, b


def keys(ds):
    return [k for batch in make_loader(ds) for k in batch["__key__"] if k]


def test_resampled_mix_follows_the_weights(two_sets):
    a, b = two_sets
    sources = load_sources([{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}])
    ds = ShardDataset(
        sources,
        tiny_modalities(("text",)),
        batch_size=20,
        train=True,
        resampled=True,
        epoch_samples=800,
        num_workers=2,
        seed=4,
    )
    got = keys(ds)
    assert len(got) == 800 and len(ds) == 40
    share_b = sum(k.startswith("b") for k in got) / len(got)
    assert 0.70 < share_b < 0.80  # 3 : 1
    assert keys(ds) == got  # seeded: the same epoch again gives the same stream
    ds.epoch = 1
    assert keys(ds) != got


def test_weights_need_resampling(two_sets):
    a, b = two_sets
    with pytest.raises(DataError, match="resampled=true"):
        ShardDataset(
            load_sources([{"path": str(a), "weight": 2.0}, str(b)]),
            tiny_modalities(("text",)),
            batch_size=4,
            train=True,
        )


def test_exact_epoch_over_several_datasets(two_sets):
    a, b = two_sets
    ds = ShardDataset(
        load_sources([str(a), str(b)]), tiny_modalities(("text",)), batch_size=5, train=True, num_workers=2
    )  # 50 samples, 2 workers of 25: 5 full batches each, nothing dropped
    assert sorted(keys(ds)) == sorted([f"a{i:04d}" for i in range(40)] + [f"b{i:04d}" for i in range(10)])


def test_modality_dropout_never_drops_a_sample(two_sets):
    a, _ = two_sets
    mods = tiny_modalities(("image", "text"))
    ds = ShardDataset(load_sources(str(a)), mods, batch_size=10, train=True, modality_dropout={"image": 0.5})
    counts = Counter()
    n_image = n_rows = 0
    for batch in make_loader(ds):
        counts.update(batch["counts"])
        n_image += int(batch["mask"]["image"].sum())
        n_rows += sum(1 for k in batch["__key__"] if k)
    assert n_rows == 40 and 10 <= counts["dropped/image"] <= 30 and n_image == 40 - counts["dropped/image"]
    with pytest.raises(ValueError, match="audio"):
        next(
            iter(
                make_loader(
                    ShardDataset(load_sources(str(a)), mods, batch_size=10, train=True, modality_dropout={"audio": 0.5})
                )
            )
        )


def test_preflight_names_a_missing_modality(two_sets):
    a, _ = two_sets  # no audio at all
    with pytest.raises(DataError, match=r"configured modalities \['audio'\] appear in none"):
        preflight(load_sources(str(a)), tiny_modalities(), world_size=1, num_workers=1, batch_size=4)
    info = preflight(
        load_sources(str(a)), tiny_modalities(("image", "text")), world_size=2, num_workers=4, batch_size=4
    )
    assert info == {"samples": 40, "shards": 4}


def test_cli_stops_when_too_much_data_is_bad(demo_data, tmp_path):
    samples = [sample(i) for i in range(64)]
    for i in range(0, 64, 3):
        samples[i].update(png=b"x", flac=b"x", txt="")
    data = write_dataset(tmp_path / "bad", samples, shard_size=16)
    proc = run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            tmp_path / "run",
            f"data.train={data}",
            "data.eval=null",
            "data.bad_check_after=16",
            "data.max_bad_fraction=0.2",
            "trainer.max_steps=8",
            "modality.audio.clip_seconds=0.5",
        ),
        check=False,
    )
    assert proc.returncode != 0
    assert "above data.max_bad_fraction=0.2" in proc.stderr and "Worst shards: part-0000" in proc.stderr
