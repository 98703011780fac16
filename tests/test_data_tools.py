"""contrastive-data shards / verify / stats, through the real CLI where it matters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from contrastive.data import ShardDataset, list_shards, load_sources, make_loader
from contrastive.data_tools.inspect import stats, verify
from contrastive.data_tools.shards import build_shards

from conftest import run_cli
from datasets import flac, png, sample, tiny_modalities, write_dataset


def make_folder(root: Path, n: int = 7) -> Path:
    raw = root / "raw"
    (raw / "sub").mkdir(parents=True)
    for i in range(n):
        base = (raw / "sub" if i % 2 else raw) / f"item{i}"
        base.with_suffix(".png").write_bytes(png(i))
        if i % 3:
            base.with_suffix(".flac").write_bytes(flac(i))
        base.with_suffix(".txt").write_text(f"caption {i}")
        base.with_suffix(".json").write_text(json.dumps({"label": f"c{i % 2}"}))
    (raw / "notes.xyz").write_text("not data")
    return raw


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_shards_from_a_folder_paired_by_stem_are_deterministic(tmp_path):
    raw = make_folder(tmp_path)
    proc = run_cli(
        "contrastive-data", "shards", str(tmp_path / "a"), "--folder", str(raw), "--max-count", "3", "--workers", "2"
    )
    assert "7 samples in 3 shards" in proc.stdout and "1 files skipped" in proc.stdout
    build_shards(tmp_path / "b", folder=str(raw), max_count=3, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")  # same input, same bytes, any worker count
    assert [s.samples for s in list_shards(tmp_path / "a")] == [3, 3, 1]
    ds = ShardDataset(load_sources(str(tmp_path / "a")), tiny_modalities(), batch_size=7, train=False)
    (batch,) = list(make_loader(ds))
    keys = sorted(batch["__key__"])
    assert keys == sorted(["item0", "item2", "item4", "item6", "sub_item1", "sub_item3", "sub_item5"])
    by_key = dict(zip(batch["__key__"], range(7)))
    assert not batch["mask"]["audio"][by_key["item0"]] and batch["mask"]["audio"][by_key["sub_item1"]]
    assert batch["label"][by_key["item2"]] == "c0"


def test_shards_by_bytes(tmp_path):
    raw = make_folder(tmp_path)
    result = build_shards(tmp_path / "out", folder=str(raw), max_count=1000, max_bytes=4000, workers=2)
    assert len(result["sizes"]) > 1 and sum(result["sizes"].values()) == 7


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_shards_from_a_manifest(tmp_path, fmt):
    make_folder(tmp_path)
    rows = [
        {"key": "a", "image": "raw/item0.png", "text": "first", "label": "x"},
        {"key": "b", "audio": "raw/sub/item1.flac", "text_path": "raw/sub/item1.txt"},
        {"image": "raw/item2.png", "audio": "raw/item2.flac", "label": "y"},
    ]
    manifest = tmp_path / f"pairs.{fmt}"
    if fmt == "csv":
        cols = ["key", "image", "audio", "text", "text_path", "label"]
        manifest.write_text(
            ",".join(cols) + "\n" + "\n".join(",".join(r.get(c, "") for c in cols) for r in rows) + "\n"
        )
    else:
        manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    build_shards(tmp_path / "out", manifest=str(manifest), max_count=2, workers=2)
    ds = ShardDataset(load_sources(str(tmp_path / "out")), tiny_modalities(), batch_size=3, train=False)
    (batch,) = list(make_loader(ds))
    assert batch["__key__"] == ["a", "b", "00000002"]
    assert batch["mask"]["text"].tolist() == [True, True, False]
    assert batch["mask"]["audio"].tolist() == [False, True, True]
    assert batch["label"] == ["x", None, "y"]


def test_manifest_problems_are_named(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"image": "nope.png"}) + "\n" + json.dumps({"imgae": "x.png"}) + "\n")
    proc = run_cli("contrastive-data", "shards", str(tmp_path / "out"), "--manifest", str(manifest), check=False)
    assert proc.returncode == 2
    assert "row 1: image" in proc.stderr and "does not exist" in proc.stderr
    assert "row 2: unknown column(s) ['imgae']" in proc.stderr


def test_verify_clean_and_corrupt(tmp_path):
    samples = [sample(i) for i in range(12)]
    clean = write_dataset(tmp_path / "clean", samples, shard_size=5)
    proc = run_cli("contrastive-data", "verify", str(clean))
    assert "OK" in proc.stdout and "12 samples in 3 shards" in proc.stdout

    samples[3]["png"] = b"broken"
    samples[8]["flac"] = samples[8]["flac"][:100]
    bad = write_dataset(tmp_path / "bad", samples, shard_size=5)
    proc = run_cli("contrastive-data", "verify", str(bad), "--json", str(tmp_path / "r.json"), check=False)
    assert proc.returncode == 1 and "FAILED" in proc.stdout
    assert "part-000000.tar s00003 [image]" in proc.stdout and "part-000001.tar s00008 [audio]" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["corrupt"] == {"image": 1, "audio": 1} and report["bad_samples"] == 2
    assert run_cli("contrastive-data", "verify", str(bad), "--max-bad-fraction", "0.2").returncode == 0


def test_verify_reports_broken_shards_and_sizes(tmp_path):
    path = write_dataset(tmp_path / "ds", [sample(i) for i in range(15)], shard_size=5)
    tar = path / "part-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    sizes = json.loads((path / "sizes.json").read_text())
    sizes["part-000002.tar"] = 9
    (path / "sizes.json").write_text(json.dumps(sizes))
    report, ok = verify(str(path))
    assert not ok
    assert "part-000001.tar" in report["broken_shards"]
    assert report["sizes_mismatch"]["part-000002.tar"] == {"sizes_json": 9, "actual": 5}


def test_stats(tmp_path):
    samples = [sample(i, audio=i < 6) for i in range(10)]
    path = write_dataset(tmp_path / "ds", samples, shard_size=4)
    s = stats(str(path))
    assert s["samples"] == 10 and s["coverage"]["audio"] == 0.6 and s["coverage"]["image"] == 1.0
    assert s["audio_seconds"]["median"] == pytest.approx(0.3) and s["image_width"]["max"] == 16
    assert s["caption_words"]["min"] == 3 and s["labels"] == 3
