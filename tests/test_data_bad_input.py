"""Every kind of bad input, through the real pipeline and a real 2-worker DataLoader: the epoch
completes, the kind's counter holds the right count, and every valid sample is delivered."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from contrastive.data import ShardDataset, load_sources, make_loader
from contrastive.data.checks import check_bad_fraction
from contrastive.data.shards import DataError

from datasets import flac, sample, tiny_modalities, write_dataset

MODS = ("image", "audio", "text")


def run_epoch(path: Path, mods=MODS, batch_size=4, workers=2):
    """One pass over every sample (as evaluation reads a set: training would drop each worker's last
    partial batch), through 2 DataLoader workers."""
    ds = ShardDataset(
        load_sources(str(path)), tiny_modalities(mods), batch_size=batch_size, train=False, num_workers=workers, seed=0
    )
    batches = list(make_loader(ds))
    assert len(batches) == len(ds)
    counts = sum((Counter(b["counts"]) for b in batches), Counter())
    delivered = {}
    for b in batches:
        for j, key in enumerate(b["__key__"]):
            if key:
                delivered[key] = {m for m in mods if bool(b["mask"][m][j])}
    return counts, delivered


def write(tmp_path, samples, shard_size=5):
    return write_dataset(tmp_path / "ds", samples, shard_size=shard_size)


def test_clean_data_counts_nothing_bad(tmp_path):
    counts, delivered = run_epoch(write(tmp_path, [sample(i) for i in range(12)]))
    assert not [k for k in counts if k.startswith("bad")] and len(delivered) == 12


@pytest.mark.parametrize(
    "kind,corrupt,lost",
    [
        ("image", lambda s: s.update(png=b"\x89PNG\r\n\x1a\nbroken"), "image"),
        ("image", lambda s: s.update(png=s["png"][: len(s["png"]) // 3]), "image"),
        ("audio", lambda s: s.update(flac=s["flac"][:200]), "audio"),  # truncated
        ("audio", lambda s: s.update(flac=b"fLaC" + os.urandom(300)), "audio"),  # undecodable
        ("audio", lambda s: s.update(flac=flac(0, seconds=0.01)), "audio"),  # too short to be a clip
        ("text", lambda s: s.update(txt="   "), "text"),  # empty
        ("text", lambda s: s.update(txt=b"\xff\xfe caf\xe9"), "text"),  # not UTF-8
    ],
)
def test_bad_modality_is_counted_and_the_rest_of_the_sample_kept(tmp_path, kind, corrupt, lost):
    samples = [sample(i) for i in range(14)]
    for i in (2, 9, 13):
        corrupt(samples[i])
    counts, delivered = run_epoch(write(tmp_path, samples))
    assert counts[f"bad/{kind}"] == 3
    assert counts["bad_samples"] == 3 and counts["slots"] == 14
    assert sorted(delivered) == [f"s{i:05d}" for i in range(14)]  # nothing valid dropped
    for i in range(14):
        expect = set(MODS) - ({lost} if i in (2, 9, 13) else set())
        assert delivered[f"s{i:05d}"] == expect


def test_sample_with_no_usable_modality(tmp_path):
    samples = [sample(i) for i in range(10)]
    samples[3] = {"__key__": "s00003", "json": {"label": "x"}}  # metadata only
    samples[6].update(png=b"bad", flac=b"bad", txt="")  # everything corrupt
    counts, delivered = run_epoch(write(tmp_path, samples))
    assert counts["bad/empty_sample"] == 2
    assert counts["bad/image"] == counts["bad/audio"] == counts["bad/text"] == 1
    assert sorted(delivered) == [f"s{i:05d}" for i in range(10) if i not in (3, 6)]


def test_unknown_extension_is_counted_and_the_sample_used(tmp_path):
    samples = [sample(i) for i in range(10)]
    samples[1]["xyz"] = b"what is this"
    samples[7]["seg"] = "3"  # (cls is metadata now: a class index)
    counts, delivered = run_epoch(write(tmp_path, samples))
    assert counts["bad/unknown_extension"] == 2 and counts["bad_samples"] == 0
    assert len(delivered) == 10 and delivered["s00001"] == set(MODS)


def test_truncated_tar(tmp_path):
    path = write(tmp_path, [sample(i) for i in range(15)], shard_size=5)
    shard = path / "part-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.55)])  # cut inside its third or so sample
    counts, delivered = run_epoch(path)
    lost = 5 - len([k for k in delivered if 5 <= int(k[1:]) < 10])
    assert 1 <= lost <= 4 and counts["bad/truncated_shard"] == lost
    assert all(f"s{i:05d}" in delivered for i in list(range(5)) + list(range(10, 15)))


def test_unreadable_shard(tmp_path):
    path = write(tmp_path, [sample(i) for i in range(15)], shard_size=5)
    (path / "part-000002.tar").write_bytes(b"this is not a tar file" * 100)
    counts, delivered = run_epoch(path)
    assert counts["bad/unreadable_shard"] == 5
    assert sorted(delivered) == [f"s{i:05d}" for i in range(10)]


def test_missing_sizes_json_counts_the_shards(tmp_path):
    path = write(tmp_path, [sample(i) for i in range(13)], shard_size=5)
    (path / "sizes.json").unlink()
    counts, delivered = run_epoch(path)
    assert len(delivered) == 13 and not [k for k in counts if k.startswith("bad")]


def test_unreadable_sizes_json_counts_the_shards(tmp_path):
    path = write(tmp_path, [sample(i) for i in range(13)], shard_size=5)
    (path / "sizes.json").write_text("{not json")
    counts, delivered = run_epoch(path)
    assert len(delivered) == 13


@pytest.mark.parametrize(
    "claimed,kind,count,delivered",
    [
        (7, "bad/short_shard", 2, 10),  # 2 slots the shard cannot fill: counted, the rest delivered
        (3, "bad/sizes_mismatch", 2, 8),  # 2 samples never read: counted, not lost silently
    ],
)
def test_wrong_sizes_json(tmp_path, claimed, kind, count, delivered):
    path = write(tmp_path, [sample(i) for i in range(10)], shard_size=5)
    sizes = json.loads((path / "sizes.json").read_text())
    sizes["part-000001.tar"] = claimed
    (path / "sizes.json").write_text(json.dumps(sizes))
    counts, got = run_epoch(path)
    assert counts[kind] == count and len(got) == delivered


def test_bad_fraction_stops_with_the_worst_shards(tmp_path):
    samples = [sample(i) for i in range(20)]
    for i in (5, 6, 7, 8, 12):
        samples[i]["png"] = b"broken"
        samples[i]["flac"] = b"broken"
        samples[i]["txt"] = ""
    counts, _ = run_epoch(write(tmp_path, samples))
    check_bad_fraction(counts, max_fraction=0.3, min_slots=10)  # 25%: fine
    with pytest.raises(DataError, match=r"part-000001.tar \(4\), part-000002.tar \(1\)"):
        check_bad_fraction(counts, max_fraction=0.2, min_slots=10)
    check_bad_fraction(counts, max_fraction=0.2, min_slots=100)  # too early to judge


def test_a_long_clip_is_decoded_from_its_window_and_a_shard_cut_since_is_a_counted_skip(tmp_path):
    """Training reads a long clip's window from the shard file (tar.Span), not the whole member;
    a shard cut short between listing and decoding counts the clip as bad audio, the caption kept."""
    from contrastive.data.decode import BatchDecoder
    from contrastive.data.sources import iter_tar_samples
    from contrastive.data.tar import Span

    from pathological import looped_flac

    flac = looped_flac(120, seed=1)  # 1.4 MB: over tar.LAZY_OVER
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("c0.flac", flac), ("c0.txt", b"tone"), ("c1.flac", flac), ("c1.txt", b"tone")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "clips.tar"
    path.write_bytes(buf.getvalue())
    samples = list(iter_tar_samples(str(path), lazy_over=1 << 20))
    assert all(isinstance(s["flac"], Span) for s in samples)
    decoder = BatchDecoder(tiny_modalities(("audio", "text")), train=True, seed=0, epoch=0)
    counts: Counter = Counter()
    row, _, _ = decoder.decode_sample(samples[0], counts)
    whole, _, _ = decoder.decode_sample({**samples[0], "flac": flac}, counts)  # the same clip, as bytes
    assert torch.equal(row["audio"], whole["audio"]) and not counts
    with open(path, "r+b") as out:
        out.truncate(len(flac) // 2)
    row, _, _ = decoder.decode_sample(samples[1], counts)
    assert set(row) == {"text"} and counts == Counter({"bad/audio": 1})
