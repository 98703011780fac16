"""Fine-tuning controls and the ImageBind recipe: per-tower learning rates and layer-wise decay in the
optimizer's groups and the logged metrics; LoRA adapters (PEFT) that alone train and merge into an
export open_clip loads; `experiment=bind_audio` binding audio to frozen image and text towers; long
clips embedded as the mean of their windows."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from contrastive.builders import build_objective, build_optimizer
from contrastive.modalities import build_modality
from contrastive.towers import apply_tower_settings

from conftest import read_jsonl, run_cli, tiny_overrides
from datasets import TINY, tiny_modalities


def test_tower_learning_rates_and_layer_decay_are_the_optimizers_groups():
    torch.manual_seed(0)
    objective = build_objective(tiny_modalities(("image", "audio", "text")), embed_dim=16)
    towers = {"image": {"lr_scale": 0.1, "layer_decay": 0.5}, "text": {"lr_scale": 2.0}}
    opt, _ = build_optimizer(
        objective,
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        scheduler=None,
        total_steps=10,
        towers=towers,
    )
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    image = objective.model.encoders["image"]
    blocks = image.transformer.resblocks  # 2 blocks: depths 0 (embeddings), 1, 2, 3 (after the blocks)
    assert by_param[id(image.conv1.weight)]["lr"] == pytest.approx(1e-3 * 0.1 * 0.5**3)
    assert by_param[id(blocks[0].mlp.c_fc.weight)]["lr"] == pytest.approx(1e-3 * 0.1 * 0.5**2)
    assert by_param[id(blocks[1].mlp.c_fc.weight)]["lr"] == pytest.approx(1e-3 * 0.1 * 0.5)
    assert by_param[id(image.proj)]["lr"] == pytest.approx(1e-3 * 0.1)
    assert by_param[id(objective.model.encoders["text"].token_embedding.weight)]["lr"] == pytest.approx(2e-3)
    assert by_param[id(next(objective.model.encoders["audio"].parameters()))]["lr"] == pytest.approx(1e-3)
    # the decay rules are unchanged in every group: biases, norms, embeddings, temperatures undecayed
    assert by_param[id(blocks[0].mlp.c_fc.weight)]["weight_decay"] == 0.1
    assert by_param[id(blocks[0].mlp.c_fc.bias)]["weight_decay"] == 0.0
    assert by_param[id(image.class_embedding)]["weight_decay"] == 0.0
    assert by_param[id(objective.loss.losses["image-audio"].logit_scale)]["weight_decay"] == 0.0


@pytest.fixture(scope="module")
def lora_run(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            run_dir,
            "modalities=[image,text]",
            "+model.towers.image={lora: {r: 4}}",
            "+model.towers.text={lora: {}}",
            "trainer.max_steps=6",
            "optim.optimizer.lr=1e-2",
            "data.eval=null",
        ),
    )
    return run_dir


def test_lora_trains_only_the_adapters():
    objective = build_objective(tiny_modalities(("image", "text")), embed_dim=64)
    apply_tower_settings(objective.model, {"image": {"lora": {"r": 4}}, "text": {"lora": {}}})
    trainable = [n for n, p in objective.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable), trainable
    assert {n.split(".")[1] for n in trainable} == {"image", "text"}


def test_the_merged_lora_export_equals_the_trained_model_and_loads_in_open_clip(lora_run):
    import open_clip
    from PIL import Image

    import contrastive
    from contrastive.checkpoint import latest_checkpoint
    from contrastive.export import objective_from_checkpoint

    trained, _ = objective_from_checkpoint(latest_checkpoint(lora_run))
    assert any("lora_A" in n for n, _ in trained.named_parameters())  # unmerged: adapters apart
    merged = contrastive.load_pretrained(lora_run / "export")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    pictures = [
        Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)) for i in range(3)
    ]
    captions = ["the digit seven", "a photo of the number two"]
    for name, items in (("image", pictures), ("text", captions)):
        assert torch.allclose(merged.embed(name, items), trained.model.embed(name, items), atol=1e-5)
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{lora_run / 'export' / 'open_clip'}")
    with torch.no_grad():
        assert torch.allclose(
            clip.eval().encode_image(torch.stack([preprocess(p) for p in pictures]), normalize=True),
            merged.embed("image", pictures),
            atol=1e-5,
        )


def test_per_tower_learning_rates_are_logged(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            run_dir,
            "+model.towers.image={lr_scale: 0.1, layer_decay: 0.5}",
            "+model.towers.audio={lr_scale: 3.0}",
            "trainer.max_steps=2",
            "data.eval=null",
            "export=false",
        ),
    )
    row = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r][-1]
    assert row["lr/image"] == pytest.approx(0.1 * row["lr"]) and row["lr/audio"] == pytest.approx(3 * row["lr"])
    assert row["lr/base"] == pytest.approx(row["lr"])  # the text tower and the temperatures


def test_bind_audio_to_frozen_image_and_text_towers(demo_data, tmp_path):
    """ImageBind's recipe on the demo: an image-text model first, then audio bound to its frozen towers."""
    from safetensors.torch import load_file

    first, bound = tmp_path / "image_text", tmp_path / "bound"
    fast = ["data.batch_size=32", "optim.scheduler.warmup_steps=5", "trainer.log_every=20", "trainer.eval_every=0"]
    run_cli(
        "contrastive-train",
        *tiny_overrides(demo_data, first, "modalities=[image,text]", "trainer.max_steps=300", *fast),
    )
    run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            bound,
            "experiment=bind_audio",
            "trainer.max_steps=150",
            *fast,
            f"model.towers.image.init={first / 'export'}",
            f"model.towers.text.init={first / 'export'}",
        ),
    )
    before, after = (
        load_file(str(first / "export" / "model.safetensors")),
        load_file(str(bound / "export" / "model.safetensors")),
    )
    frozen = [k for k in before if k.startswith(("encoders.image.", "encoders.text."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # bit-identical
    final = read_jsonl(bound / "metrics.jsonl")[-1]
    chance = 1 / final["eval/zero_shot/classes"]
    print(json.dumps({k: v for k, v in final.items() if k.startswith("eval/") and "audio" in k}, indent=1))
    assert final["eval/zero_shot/audio->text/acc"] > 3 * chance  # emerges through the frozen image-text space
    assert final["eval/retrieval/audio->image/label_R@1"] > 3 * chance
    config = json.loads((bound / "export" / "config.json").read_text())
    assert set(config["modalities"]) == {"image", "audio", "text"}


def test_a_long_clip_is_embedded_as_the_mean_of_its_windows(tmp_path):
    from contrastive.data import ShardDataset, load_sources
    from contrastive.evaluation import embed_dataset

    from datasets import flac, write_dataset

    torch.manual_seed(0)
    audio = build_modality("audio", **{**TINY["audio"], "eval_windows": 3})
    model = build_objective({"audio": audio, "text": tiny_modalities(("text",))["text"]}, embed_dim=16).model.eval()
    n = audio.clip_samples
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, 3 * n).astype(np.float32))
    windows = [wave[:n], wave[n : 2 * n], wave[2 * n :]]  # evenly spaced over three windows' length
    with torch.no_grad():
        by_hand = torch.nn.functional.normalize(
            torch.stack([model.encode("audio", audio.preprocess(w, train=False)[None])[0] for w in windows]).mean(0),
            dim=0,
        )
    assert torch.allclose(model.embed("audio", [wave.numpy()])[0], by_hand, atol=1e-6)
    write_dataset(tmp_path, [{"__key__": "long", "flac": flac(0, seconds=3 * audio.clip_seconds), "txt": "x"}])
    wave_from_file = audio.samples(audio.decode(flac(0, seconds=3 * audio.clip_seconds), "flac"))
    expected = model.embed("audio", [wave_from_file.numpy()])[0]
    embedded = embed_dataset(
        model,
        ShardDataset(load_sources(str(tmp_path)), model.modalities, batch_size=2, train=False),
        device=torch.device("cpu"),
    )
    assert torch.allclose(embedded["embeddings"]["audio"][0], expected, atol=1e-6)
    single = build_modality("audio", **TINY["audio"])
    assert len(single.views(wave)) == 1 and len(audio.views(wave[: n // 2])) == 1


def test_short_clips_repeat_then_pad():
    audio = build_modality("audio", **{**TINY["audio"], "pad": "repeat"})
    n = audio.clip_samples
    short = torch.arange(1, 1 + n // 3 + 1, dtype=torch.float32)  # a bit over a third: 2 copies, then zeros
    padded = build_modality("audio", **TINY["audio"])
    assert not torch.equal(audio.preprocess(short, train=False), padded.preprocess(short, train=False))
    repeated = torch.cat([short, short, torch.zeros(n - 2 * len(short))])
    assert torch.equal(audio.preprocess(short, train=False), padded.preprocess(repeated, train=False))
