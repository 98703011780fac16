"""Our numbers are computed the way the field computes them: on sets in CLIP_benchmark's WebDataset
layout (written by `contrastive-data benchmark`), `contrastive-eval` on an exported model gives the same
zero-shot top-1/top-5/mean per-class recall and the same retrieval recalls (several captions per image)
as CLIP_benchmark itself (the package from the index), loading the export's open_clip-format towers.
CLIP_benchmark runs in this process through the functions its CLI calls (its dataset builder, its
open_clip loader, its zero-shot and retrieval metrics); the CLI module itself imports the captioning
metrics' pycocoevalcap, which the install leaves out. Also: an audio zero-shot set in the same layout."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from conftest import run_cli, script

CLASSES = ["red", "green", "blue", "white", "black", "yellow"]
COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 200),
    "white": (230, 230, 230),
    "black": (20, 20, 20),
    "yellow": (220, 220, 40),
}


def write_image(path, colour, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def write_manifest(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny image/audio/text model with random weights, exported (our format and open_clip's)."""
    from contrastive.builders import build_objective
    from contrastive.export import export_model

    from datasets import tiny_modalities

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export") / "export"
    export_model(build_objective(tiny_modalities(), embed_dim=16).model, out, logit_scales={"image-text": 50.0})
    return out


@pytest.fixture(scope="module")
def benchmark_sets(tmp_path_factory):
    """A classification set (36 images, 6 classes, 2 templates) and a retrieval set (12 images, 1 to 3
    captions each, given as rows sharing a group), in CLIP_benchmark's layout."""
    raw = tmp_path_factory.mktemp("raw")
    out = tmp_path_factory.mktemp("sets")
    rows = []
    for i in range(36):
        label = CLASSES[i % 6]
        write_image(raw / f"c{i}.png", COLOURS[label], i)
        rows.append({"key": f"c{i:03d}", "image": f"c{i}.png", "label": label})
    write_manifest(raw / "cls.csv", rows)
    (raw / "templates.txt").write_text("a photo of a {c} square.\n{c}\n")
    run_cli(
        "contrastive-data",
        "benchmark",
        str(out / "cls"),
        "--manifest",
        str(raw / "cls.csv"),
        "--task",
        "classification",
        "--templates",
        str(raw / "templates.txt"),
        "--max-count",
        "16",
    )
    rows = []
    for i in range(12):
        label = CLASSES[i % 6]
        write_image(raw / f"r{i}.png", COLOURS[label], 100 + i)
        for j in range(1 + i % 3):
            rows.append(
                {
                    "key": f"r{i:03d}_{j}",
                    "image": f"r{i}.png",
                    "group": f"img{i}",
                    "text": f"{['a', 'the', 'one'][j]} {label} square number {i}",
                }
            )
    write_manifest(raw / "ret.csv", rows)
    run_cli(
        "contrastive-data",
        "benchmark",
        str(out / "ret"),
        "--manifest",
        str(raw / "ret.csv"),
        "--task",
        "retrieval",
        "--max-count",
        "5",
    )
    return out


def accuracy_without_numpy_scalar_conversion(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's zeroshot_classification.accuracy, but for one conversion: it calls float()
    on a one-element array, which NumPy 2.5 refuses; here the element is taken first ([0])."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / n for k in topk]


def clip_benchmark_metrics(export, benchmark_sets, monkeypatch) -> dict:
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from clip_benchmark.models.open_clip import load_open_clip

    folder = export / "open_clip"
    open_clip.add_model_config(folder / "contrastive-image-text.json")
    model, transform, tokenizer = load_open_clip(
        "contrastive-image-text", pretrained=str(folder / "open_clip_model.safetensors")
    )
    model.eval()
    monkeypatch.setattr(zeroshot_classification, "accuracy", accuracy_without_numpy_scalar_conversion)
    out = {}
    for name, task in (("cls", "zeroshot_classification"), ("ret", "zeroshot_retrieval")):
        ds = build_dataset(f"wds/{name}", root=str(benchmark_sets / name), transform=transform, split="test", task=task)
        loader = torch.utils.data.DataLoader(ds.batched(8), batch_size=None, shuffle=False, num_workers=0)
        if task == "zeroshot_classification":
            out[name] = zeroshot_classification.evaluate(
                model, loader, tokenizer, ds.classes, ds.templates, device="cpu", amp=False
            )
        else:
            out[name] = zeroshot_retrieval.evaluate(
                model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10]
            )
    return out


def test_zero_shot_and_retrieval_agree_with_clip_benchmark(export, benchmark_sets, tmp_path, monkeypatch):
    assert (benchmark_sets / "cls" / "test" / "nshards.txt").read_text().strip() == "3"
    assert (benchmark_sets / "cls" / "classnames.txt").read_text().split() == sorted(CLASSES)
    run_cli(
        "contrastive-eval",
        str(export),
        "--set",
        f"cls={benchmark_sets / 'cls'}",
        "--set",
        f"ret={benchmark_sets / 'ret'}",
        "--json",
        str(tmp_path / "ours.json"),
    )
    ours = json.loads((tmp_path / "ours.json").read_text())
    theirs = clip_benchmark_metrics(export, benchmark_sets, monkeypatch)
    assert ours["cls/zero_shot/classes"] == 6
    assert ours["cls/zero_shot/image->text/acc"] == pytest.approx(theirs["cls"]["acc1"], abs=1e-4)
    assert ours["cls/zero_shot/image->text/top5"] == pytest.approx(theirs["cls"]["acc5"], abs=1e-4)
    assert ours["cls/zero_shot/image->text/mean_per_class_recall"] == pytest.approx(
        theirs["cls"]["mean_per_class_recall"], abs=1e-4
    )
    assert ours["ret/retrieval/image-text/n"] == 12 and ours["ret/retrieval/image-text/captions"] == 24
    for k in (1, 5, 10):
        # CLIP_benchmark's "image retrieval" is text->image (a caption finds its image), its "text
        # retrieval" image->text (an image finds any of its captions)
        assert ours[f"ret/retrieval/text->image/R@{k}"] == pytest.approx(
            theirs["ret"][f"image_retrieval_recall@{k}"], abs=1e-4
        ), k
        assert ours[f"ret/retrieval/image->text/R@{k}"] == pytest.approx(
            theirs["ret"][f"text_retrieval_recall@{k}"], abs=1e-4
        ), k
    # not all perfect or all zero: the comparison has something to compare
    assert 0 < ours["ret/retrieval/text->image/R@1"] < 1


def test_an_audio_zero_shot_set_in_the_same_layout_is_scored(export, tmp_path):
    """ESC-50's shape: clips and class names, templates with {c}; scored audio->text."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = []
    for i in range(12):
        label = ["dog", "rain", "siren"][i % 3]
        buf = io.BytesIO()
        wave = 0.1 * np.sin(np.arange(8000) * (0.05 + 0.05 * (i % 3))) + 0.01 * np.random.default_rng(i).normal(
            size=8000
        )
        soundfile.write(buf, wave.astype(np.float32), 16000, format="FLAC")
        (raw / f"a{i}.flac").write_bytes(buf.getvalue())
        rows.append({"key": f"a{i:03d}", "audio": f"a{i}.flac", "label": label})
    write_manifest(raw / "esc.csv", rows)
    (raw / "sound.txt").write_text("the sound of a {c}\na {c} can be heard\n")
    run_cli(
        "contrastive-data",
        "benchmark",
        str(tmp_path / "esc"),
        "--manifest",
        str(raw / "esc.csv"),
        "--task",
        "classification",
        "--templates",
        str(raw / "sound.txt"),
    )
    proc = run_cli(
        "contrastive-eval", str(export), "--set", f"esc={tmp_path / 'esc'}", "--json", str(tmp_path / "m.json")
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["esc/zero_shot/classes"] == 3
    assert {"esc/zero_shot/audio->text/acc", "esc/zero_shot/audio->text/mean_per_class_recall"} <= set(metrics)
    assert "esc/zero_shot/audio->text/top5" not in metrics  # fewer than five classes
    assert "== eval set esc ==" in proc.stdout and "audio->text" in proc.stdout


def test_two_ranks_embed_the_sets_once_between_them_with_the_same_figures(export, benchmark_sets, tmp_path):

    args = [
        str(export),
        "--set",
        f"cls={benchmark_sets / 'cls'}",
        "--set",
        f"ret={benchmark_sets / 'ret'}",
        "--batch-size",
        "4",
    ]
    run_cli("contrastive-eval", *args, "--json", str(tmp_path / "one.json"))
    run_cli(
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        *script("contrastive-eval"),
        *args,
        "--json",
        str(tmp_path / "two.json"),
    )
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-6), key
