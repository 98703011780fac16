"""Several eval sets in one training run, each reported under its own name in metrics.jsonl, the console
table and the plots; the linear probe through contrastive-eval; a set's settings checked by name."""

from __future__ import annotations

import csv
import json

import pytest

from contrastive.data.sources import iter_tar_samples
from contrastive.evaluation import resolve_set
from contrastive.modalities import ConfigError
from contrastive.plots import plot_recall

from conftest import read_jsonl, run_cli, tiny_overrides

SETS = ("digits", "spoken", "captions")


@pytest.fixture(scope="module")
def three_set_run(demo_data, tmp_path_factory):
    """The demo's held-out split as three sets: as is (our layout, zero-shot + retrieval), its clips as
    a CLIP_benchmark audio classification set, its images and captions as a retrieval set in which
    the samples of one digit picture share a group."""
    tmp = tmp_path_factory.mktemp("sets")
    raw = tmp / "raw"
    raw.mkdir()
    audio_rows, caption_rows = [], []
    for tar in sorted((demo_data / "heldout").glob("*.tar")):
        for sample in iter_tar_samples(str(tar)):
            key, label = sample["__key__"], json.loads(sample["json"])["label"]
            if "flac" in sample:
                (raw / f"{key}.flac").write_bytes(sample["flac"])
                audio_rows.append({"key": key, "audio": f"{key}.flac", "label": label})
            image = next((e for e in ("png", "jpg") if e in sample), None)
            if image and "txt" in sample:
                (raw / f"{key}.{image}").write_bytes(sample[image])
                caption_rows.append(
                    {"key": key, "image": f"{key}.{image}", "text": sample["txt"].decode(), "group": label}
                )
    for name, rows in (("audio", audio_rows), ("captions", caption_rows)):
        with (raw / f"{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (raw / "sound.txt").write_text("someone says {c}\n{c}\n")
    run_cli(
        "contrastive-data",
        "benchmark",
        str(tmp / "spoken"),
        "--manifest",
        str(raw / "audio.csv"),
        "--task",
        "classification",
        "--templates",
        str(raw / "sound.txt"),
    )
    run_cli(
        "contrastive-data",
        "benchmark",
        str(tmp / "captions"),
        "--manifest",
        str(raw / "captions.csv"),
        "--task",
        "retrieval",
    )
    run_dir = tmp / "run"
    sets = [
        f"+eval.sets.digits={{path: {demo_data / 'heldout'}}}",
        f"+eval.sets.spoken={{path: {tmp / 'spoken'}}}",
        f"+eval.sets.captions={{path: {tmp / 'captions'}}}",
    ]
    proc = run_cli("contrastive-train", *tiny_overrides(demo_data, run_dir, "data.eval=null", *sets))
    return run_dir, proc, len(caption_rows), len({row["group"] for row in caption_rows})


def test_each_set_is_reported_under_its_name(three_set_run):
    run_dir, proc, captions, digits = three_set_run
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert {
        "eval/digits/zero_shot/image->text/acc",
        "eval/digits/zero_shot/audio->text/top5",
        "eval/digits/retrieval/image->audio/R@1",
    } <= set(final)
    assert {"eval/spoken/zero_shot/audio->text/acc", "eval/spoken/zero_shot/audio->text/mean_per_class_recall"} <= set(
        final
    )
    assert not any(k.startswith("eval/spoken/retrieval/") for k in final)  # one modality: nothing to retrieve
    # the captions set: the held-out samples' pictures grouped by digit: an item a digit, a caption a sample
    assert final["eval/captions/retrieval/image-text/n"] == digits > 1
    assert final["eval/captions/retrieval/image-text/captions"] == captions
    assert not any(k.startswith("eval/zero_shot") or k.startswith("eval/retrieval") for k in final)  # no data.eval
    log = proc.stdout + proc.stderr
    for name in SETS:
        assert f"== eval set {name} ==" in log
    names = plot_recall(read_jsonl(run_dir / "metrics.jsonl"), run_dir / "check.png")
    for name in ("digits", "captions"):
        assert f"retrieval: {name}: image->text" in names
    assert "zero_shot: spoken: audio->text" in names and (run_dir / "recall.png").exists()


def test_the_linear_probe_beats_zero_shot_on_the_held_out_split(three_set_run, demo_data, tmp_path):
    run_dir = three_set_run[0]
    proc = run_cli(
        "contrastive-eval",
        str(run_dir / "export"),
        "--data",
        str(demo_data / "heldout"),
        "--task",
        "zeroshot_classification,linear_probe",
        "--probe-train",
        str(demo_data / "train"),
        "--json",
        str(tmp_path / "m.json"),
    )
    m = json.loads((tmp_path / "m.json").read_text())
    for modality in ("image", "audio"):
        assert m[f"linear_probe/{modality}/acc"] > m[f"zero_shot/{modality}->text/acc"], m
    assert "linear probe (logistic regression)" in proc.stdout


def test_a_set_names_its_wrong_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.sets.x: unknown key\(s\) \['pth'\]"):
        resolve_set("x", {"pth": str(tmp_path)})
    with pytest.raises(ConfigError, match="eval.sets.x.task"):
        resolve_set("x", {"path": str(tmp_path), "task": "segmentation"})
    with pytest.raises(ConfigError, match="eval.sets.x.probe_train"):
        resolve_set("x", {"path": str(tmp_path), "task": "linear_probe"})
