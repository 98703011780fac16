"""`contrastive-data emoji`: the harder data set of benchmarks/quality.py, its held-out concepts kept
apart, and `experiment=emoji` training and evaluating on it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import soundfile
from PIL import Image

from contrastive.data_tools.emoji import Renderer, concepts
from tests.conftest import read_jsonl, run_cli


@pytest.fixture(scope="module")
def emoji_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emoji")
    proc = run_cli("contrastive-data", "emoji", str(out), "--max-concepts", "30", "--copies", "2", "--shard-size", "25")
    assert "train 48 samples, heldout 12 samples, seen 24 samples" in proc.stdout, proc.stdout
    return out


def samples(split: Path) -> list[dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(found.values())


def test_concepts_are_named_emoji_the_font_draws():
    found = concepts()
    assert len(found) > 1200  # Debian 12's font and CLDR: 1,354
    by_char = {e.char: e for e in found}
    assert by_char["😂"].name == "face with tears of joy" and "laugh" in by_char["😂"].keywords
    assert "face with tears of joy" not in by_char["😂"].keywords  # the name is not its own keyword
    assert not any(0x1F3FB <= ord(e.char) <= 0x1F3FF for e in found)  # skin tones are not concepts
    assert len({e.name for e in found}) == len(found)  # a name is a class: no two concepts share one


def test_views_differ_and_show_the_emoji():
    import random

    renderer = Renderer(64)
    rng = random.Random(0)
    a, b = renderer.view("🐶", rng), renderer.view("🐶", rng)
    assert a.size == b.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() != b.tobytes()  # its own background, size, position and tilt
    # the glyph's colours cover a good part of the frame, not a speck or a missing-glyph box
    glyph = renderer.glyph("🐶")
    assert glyph.getbbox() is not None and glyph.width > 60 and glyph.height > 60


def test_heldout_concepts_never_occur_in_training(emoji_data):
    rows = [line.split("\t") for line in (emoji_data / "concepts.tsv").read_text().splitlines()]
    train = {name for split, _, name in rows if split == "train"}
    held = {name for split, _, name in rows if split == "heldout"}
    assert len(held) == 6 and len(train) == 24 and not train & held
    train_samples, held_samples = samples(emoji_data / "train"), samples(emoji_data / "heldout")
    assert {json.loads(s["json"])["label"] for s in train_samples} <= train
    assert {json.loads(s["json"])["label"] for s in held_samples} == held
    assert {json.loads(s["json"])["label"] for s in samples(emoji_data / "seen")} == train  # one new view each
    for s in held_samples:  # the held-out split is complete: image, audio and caption
        image = Image.open(io.BytesIO(s.get("png") or s["jpg"]))
        assert image.size == (64, 64)
        wave, rate = soundfile.read(io.BytesIO(s.get("flac") or s["wav"]))
        assert rate == 16_000 and 0.2 < len(wave) / rate < 6
        assert json.loads(s["json"])["label"] in s["txt"].decode()
    run_cli("contrastive-data", "verify", str(emoji_data / "train"))


def test_experiment_emoji_trains_and_scores_unseen_concepts(emoji_data, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        "contrastive-train",
        "experiment=emoji",
        "debug=smoke",
        f"data.train={emoji_data / 'train'}",
        f"data.eval={emoji_data / 'heldout'}",
        f"eval.sets.seen.path={emoji_data / 'seen'}",
        "trainer.eval_every=4",
        "trainer.threads=1",
        "export=false",
        f"hydra.run.dir={run_dir}",
    )
    final = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/zero_shot/image->text/acc" in r][-1]
    for modality in ("image", "audio"):  # six unseen names: a real 6-way zero-shot on both towers
        assert 0.0 <= final[f"eval/zero_shot/{modality}->text/acc"] <= 1.0
    assert "eval/retrieval/text->image/R@1" in final
    assert 0.0 <= final["eval/seen/zero_shot/image->text/acc"] <= 1.0  # new views of the training concepts


def test_a_missing_package_is_named(tmp_path):
    with pytest.raises(RuntimeError, match="fonts-noto-color-emoji"):
        concepts(font=tmp_path / "NotoColorEmoji.ttf")
