"""Training on a set where three shards are damaged at the tar level (a pax record of length zero, a
size field of 2^60, a negative base-256 size): the run finishes, counts exactly those shards as
broken, trains every sample of the intact shards exactly once, and `contrastive-data verify` and
`stats` name the same three shards."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from contrastive.data.shards import ShardWriter
from contrastive.data.sources import iter_tar_samples

from conftest import read_jsonl, run_cli, tiny_overrides
from tar_fuzz import checksum, header_block, padded, size_field

SHARDS, PER_SHARD = 16, 10
DAMAGED_AT = 6  # the damage sits in front of each damaged shard's 7th sample
# What a reader gets out of a damaged shard: the samples before the damage, except the last of them,
# which may lack members that the damage hid (so 5 of 10 are read and 5 counted as lost).
READABLE = DAMAGED_AT - 1


def pax_length_zero(data: bytes, at: int) -> bytes:
    body = b"0 path=x\n"
    return data[:at] + header_block(b"PaxHeaders/x", len(body), b"x") + padded(body) + data[at:]


def size_set_to(value: int):
    def damage(data: bytes, at: int) -> bytes:
        header = bytearray(data[at : at + 512])
        header[124:136] = size_field(value)
        checksum(header)
        return data[:at] + bytes(header) + data[at + 512 :]

    return damage


DAMAGE = {
    "part-000003.tar": pax_length_zero,
    "part-000008.tar": size_set_to(2**60),
    "part-000013.tar": size_set_to(-(2**40)),
}


@pytest.fixture(scope="module")
def damaged_set(demo_data, tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    """The demo's training samples in 16 shards of 10, three of them damaged; (the set, each shard's keys)."""
    out = tmp_path_factory.mktemp("damaged") / "train"
    samples = [s for shard in sorted((demo_data / "train").glob("*.tar")) for s in iter_tar_samples(str(shard))]
    with ShardWriter(out, prefix="part", max_count=PER_SHARD) as writer:
        writer.write_all(samples[: SHARDS * PER_SHARD])
    keys = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        order = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
        keys[shard.name] = set(order)
        if shard.name in DAMAGE:
            at = next(m.offset for m in members if m.name.startswith(order[DAMAGED_AT] + "."))
            shard.write_bytes(DAMAGE[shard.name](shard.read_bytes(), at))
            keys[shard.name] = set(order[:READABLE])
    return out, keys


def test_a_run_over_damaged_shards_finishes_and_counts_them(damaged_set, demo_data, tmp_path):
    train, keys = damaged_set
    run_dir = tmp_path / "run"
    # one epoch: 160 slots over 2 workers in batches of 16 -> 5 batches a worker, 10 steps
    proc = run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            run_dir,
            f"data.train={train}",
            "data.num_workers=2",
            "trainer.max_steps=10",
            "trainer.record_keys=true",
            "data.max_bad_fraction=0.2",  # 15 of 160 samples (9.4%) are lost: more than the default 5%
            "data.bad_check_after=0",
        ),
    )
    trained = Counter(k for row in read_jsonl(run_dir / "keys" / "rank0.jsonl") for k in row["keys"])
    assert max(trained.values()) == 1  # nothing twice
    intact = set().union(*(k for name, k in keys.items() if name not in DAMAGE))
    assert intact <= set(trained)  # every sample of the intact shards
    readable = set().union(*keys.values())
    assert set(trained) == readable  # and of the damaged ones what precedes the damage, nothing else
    last = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row][-1]  # the last step's
    assert last["data/broken_shards"] == 3
    assert last["data/bad/truncated_shard"] == 3 * (PER_SHARD - READABLE)
    log = proc.stdout + proc.stderr
    assert f"broken shards: 3 ({', '.join(sorted(DAMAGE))})" in log
    assert "malformed pax record" in log and "over the limit" in log and "negative size" in log


def test_verify_and_stats_name_exactly_the_damaged_shards(damaged_set, tmp_path):
    train, _ = damaged_set
    proc = run_cli("contrastive-data", "verify", str(train), "--json", str(tmp_path / "v.json"), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert sorted(report["broken_shards"]) == sorted(DAMAGE)
    assert all(error.startswith(f"truncated after {READABLE} samples") for error in report["broken_shards"].values())
    proc = run_cli("contrastive-data", "stats", str(train), "--json", str(tmp_path / "s.json"))
    assert sorted(json.loads((tmp_path / "s.json").read_text())["broken_shards"]) == sorted(DAMAGE)
    assert proc.stdout.count("broken shard part-") == 3
