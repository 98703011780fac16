"""contrastive-data's curation commands on the demo set with planted problems (mismatched captions,
exact and near copies, held-out samples leaked into train) and on a skewed concept distribution:
what each finds, the same bytes whatever the worker count or where the shards are served from, and
the source left as it was."""

from __future__ import annotations

import hashlib
import json
import math
import random
import tarfile
from pathlib import Path

import pytest

from contrastive.data.shards import ShardWriter
from contrastive.data_tools.pollute import pollute

from conftest import run_cli, tiny_overrides
from servers import http_server


def tree(directory: Path, names: str = "*") -> dict[str, str]:
    """File name -> sha256 of every file matching `names` in `directory`."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob(names)) if p.is_file()}


def keys(directory: Path) -> list[str]:
    out = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += list(dict.fromkeys(name.split(".", 1)[0] for name in tar.getnames()))
    return out


def pairs_found(findings: list[dict]) -> set[frozenset]:
    return {frozenset((f["key"], f["of"])) for f in findings}


@pytest.fixture(scope="module")
def polluted(demo_data, tmp_path_factory):
    """The small demo's training split with problems planted, and a model trained on it a little."""
    tmp = tmp_path_factory.mktemp("curation")
    planted = pollute(
        str(demo_data / "train"), tmp / "polluted", against=str(demo_data / "heldout"), leaks=6, shard_size=40
    )
    run_cli(
        "contrastive-train",
        *tiny_overrides(demo_data, tmp / "run", f"data.train={tmp / 'polluted'}", "data.eval=null"),
        "trainer.max_steps=30",
        "data.batch_size=32",
        "optim.grad_clip=1.0",  # a 30-step scorer: clipping learns faster in a run's first ~150 steps
    )
    return tmp, planted


def test_dedup_finds_every_planted_copy_and_leak_the_same_with_1_and_4_workers(polluted, demo_data):
    tmp, planted = polluted
    source = tree(tmp / "polluted")
    outputs = []
    for workers in (1, 4):
        out = tmp / f"dedup-{workers}"
        run_cli(
            "contrastive-data",
            *("dedup", str(tmp / "polluted"), "--against", str(demo_data / "heldout"), "--model", str(tmp / "run")),
            *("--threshold", "0.99", "--out", str(out), "--workers", str(workers)),
        )
        outputs.append(tree(out))
    assert outputs[0] == outputs[1] and len(outputs[0]) >= 4  # shards, sizes.json, curation.json, dedup.png
    assert not list((tmp / "dedup-1").glob("dedup-work*")), "no scratch left in the output set"
    assert tree(tmp / "polluted") == source, "the source is never modified"
    report = json.loads((tmp / "dedup-1" / "curation.json").read_text())
    found = pairs_found(report["duplicates"])
    for kind in ("duplicates", "near_duplicates"):
        missed = [(k, v) for k, v in planted[kind].items() if frozenset((k, v)) not in found]
        assert not missed, f"planted {kind} not found: {missed}"
    exact = {f["key"]: f["of"] for f in report["leaks"] if f["kind"] == "exact"}
    assert exact == planted["leaks"]  # each planted leak, and no other exact copy
    gone = {f["key"] for f in report["duplicates"] + report["leaks"]}
    assert set(keys(tmp / "dedup-1")) == set(keys(tmp / "polluted")) - gone
    assert json.loads((tmp / "dedup-1" / "sizes.json").read_text()) == {
        p.name: len(keys_of(p)) for p in (tmp / "dedup-1").glob("*.tar")
    }


def keys_of(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        return {name.split(".", 1)[0] for name in tar.getnames()}


def test_score_then_filter_keeps_the_top_share_and_reads_http_as_local(polluted):
    tmp, planted = polluted
    scores = tmp / "scores"
    run_cli("contrastive-data", "score", str(tmp / "polluted"), "--model", str(tmp / "run"), "--out", str(scores))
    report = json.loads((scores / "score.json").read_text())
    assert set(report["pairs"]) == {"image-audio", "image-text", "audio-text"}
    by_key = {k: v for p in scores.glob("*.scores.json") for k, v in json.loads(p.read_text())["scores"].items()}
    mismatched = [by_key[k]["image-text"] for k in planted["mismatched"] if "image-text" in by_key.get(k, {})]
    matched = [v["image-text"] for k, v in by_key.items() if k not in planted["mismatched"] and "image-text" in v]
    assert sum(mismatched) / len(mismatched) < sum(matched) / len(matched), "swapped captions score lower"

    out = tmp / "top"
    top = ("--scores", str(scores), "--top", "image-text:70%")
    proc = run_cli("contrastive-data", "filter", str(tmp / "polluted"), str(out), *top)
    threshold = float(proc.stdout.split("image-text>=")[1].split()[0].rstrip(","))
    with_pair = sorted((v["image-text"] for v in by_key.values() if "image-text" in v), reverse=True)
    assert sum(v >= threshold for v in with_pair) == math.ceil(0.7 * len(with_pair))
    kept = set(keys(out))
    for key, value in by_key.items():
        if "image-text" in value:
            assert (key in kept) == (value["image-text"] >= threshold), key
    lacking = set(keys(tmp / "polluted")) - {k for k, v in by_key.items() if "image-text" in v}
    assert lacking and lacking <= kept, "a sample without the pair is kept (--missing keep)"

    with http_server(tmp) as url:  # the same set served over HTTP: the same shards out
        remote = tmp / "top-http"
        run_cli("contrastive-data", "filter", f"{url}/polluted", str(remote), *top, "--workers", "3")
    assert tree(remote, "*.tar") == tree(out, "*.tar") and tree(remote, "sizes.json") == tree(out, "sizes.json")

    filt = ("contrastive-data", "filter", str(tmp / "polluted"))
    bad = run_cli(*filt, str(tmp / "x"), "--scores", str(scores), "--keep", "image-txt>0.2", check=False)
    assert bad.returncode == 2 and "no scores for the pair image-txt" in bad.stderr
    same = run_cli(*filt, str(tmp / "polluted"), *top, check=False)
    assert same.returncode == 2 and "curation never modifies its input" in same.stderr
    again = run_cli(*filt, str(out), *top, check=False)  # a second filter into the first one's output
    assert again.returncode == 2 and "holds the output of an earlier `filter`" in again.stderr
    assert "--overwrite" in again.stderr and tree(out, "*.tar") == tree(remote, "*.tar")
    highest = max(with_pair)
    strict = run_cli(*filt, str(out), "--scores", str(scores), "--keep", f"image-text>{highest}", "--overwrite")
    assert "image-text scores: min " in strict.stdout  # the distribution the condition cuts into
    assert "warning: filter dropped" in strict.stderr and "more than half the set" in strict.stderr


def test_dedup_keeps_an_image_seen_with_two_clips_and_pollute_draws(polluted, demo_data, tmp_path):
    """The demo pairs each image with two spoken clips: two pairs, no copy. At the default threshold
    the trained model keeps the clean set whole (a weak model puts a digit's images within 0.95)."""
    tmp, planted = polluted
    from contrastive.data.sources import iter_tar_samples

    samples = [s for shard in sorted((demo_data / "train").glob("*.tar")) for s in iter_tar_samples(str(shard))]
    clips = [s["flac"] for s in samples if "flac" in s]
    with ShardWriter(tmp_path / "two-clips", prefix="pairs", max_count=40) as writer:
        for i, s in enumerate(samples):
            writer.write(s)
            if "flac" in s:  # the same image again, with another sample's clip
                writer.write({**s, "__key__": s["__key__"] + "_b", "flac": clips[(i + 7) % len(clips)]})
    out = tmp_path / "deduped"
    proc = run_cli(
        "contrastive-data", "dedup", str(tmp_path / "two-clips"), "--model", str(tmp / "run"), "--out", str(out)
    )
    report = json.loads((out / "curation.json").read_text())
    assert report["dropped"] <= 0.05 * report["samples"], report["counts"]
    assert "warning" not in proc.stderr and (out / "dedup.png").stat().st_size > 0
    assert (tmp / "polluted" / "pollute.png").stat().st_size > 0


def skewed_set(directory: Path, entries: list[str], seed: int = 0) -> None:
    """Captions naming one entry each, entry i drawn with weight 1/(i+1)^1.5 (a head and a long
    tail), and one caption in ten naming none."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** 1.5 for i in range(len(entries))]
    with ShardWriter(directory, prefix="skewed", max_count=150) as writer:
        for i in range(3000):
            entry = rng.choices(entries, weights)[0]
            text = "a photo of nothing in particular" if i % 10 == 0 else f"a photo of a {entry}"
            writer.write({"__key__": f"s{i:05d}", "txt": text})


def test_balance_caps_the_head_keeps_the_tail_and_is_seeded(tmp_path):
    entries = [f"thing{chr(97 + i)}" for i in range(20)]
    skewed_set(tmp_path / "src", entries)
    (tmp_path / "entries.txt").write_text("\n".join(entries) + "\n")
    t = 60
    runs = {}
    balance = ("contrastive-data", "balance", str(tmp_path / "src"))
    options = ("--concepts", str(tmp_path / "entries.txt"), "--t", str(t))
    for name, extra in (("a", ["--workers", "1"]), ("b", ["--workers", "4"]), ("c", ["--seed", "1"])):
        run_cli(*balance, str(tmp_path / name), *options, *extra)
        runs[name] = tree(tmp_path / name)
    assert runs["a"] == runs["b"], "the same bytes whatever the worker count"
    assert runs["a"] != runs["c"], "another seed, another draw"
    report = json.loads((tmp_path / "a" / "curation.json").read_text())
    counts = report["per_entry"]
    head = [e for e, c in counts.items() if c["before"] > 3 * t]
    tail = [e for e, c in counts.items() if c["before"] <= t]
    assert len(head) >= 3 and len(tail) >= 5
    for e in tail:
        assert counts[e]["after"] == counts[e]["before"], e
    for e in head:  # kept with probability t / count: binomial around t
        assert abs(counts[e]["after"] - t) < 5 * math.sqrt(t), (e, counts[e])
    assert report["unmatched"] == 300 and "s00000" not in keys(tmp_path / "a")
    assert max(c["before"] for c in counts.values()) / max(c["after"] for c in counts.values()) > 5
    kept_unmatched = tmp_path / "u"
    run_cli(*balance, str(kept_unmatched), *options, "--keep-unmatched")
    assert "s00000" in keys(kept_unmatched)


def test_balance_keeps_a_caption_naming_several_entries_as_metaclip_does():
    from contrastive.data_tools.balance import drawn

    t, counts = 100, {0: 1000, 1: 1000, 2: 1000, 3: 50}  # three head entries at p = 0.1, one tail entry
    n = 20000
    for found, expected in (({0}, 0.1), ({0, 1, 2}, 1 - 0.9**3), ({0, 3}, 1.0)):
        rate = sum(drawn(7, f"k{i}", found, counts, t) for i in range(n)) / n
        assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9, (found, rate)
