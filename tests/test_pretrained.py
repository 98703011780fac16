"""Towers by open_clip model name equal open_clip's own models (preprocessing included), released
weights resolve offline through a Hugging Face cache laid out as a user's would be (or stop the run
with one error naming the file), and an audio tower starts from an image ViT (AST's way) or from an
AST checkpoint. No downloads: models with random weights are saved by the tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from contrastive.modalities import ConfigError, build_modality
from contrastive.model import ContrastiveModel
from contrastive.towers import init_tower, load_released_weights

from conftest import run_cli

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
VIT = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
CONFIGS = {  # names registered in open_clip, as a user's own configs would be
    "tiny-vit-quickgelu": {"embed_dim": 32, "quick_gelu": True, "vision_cfg": VIT, "text_cfg": TEXT},
    "tiny-vit": {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": TEXT},
    "tiny-convnext": {
        "embed_dim": 32,
        "text_cfg": TEXT,
        "vision_cfg": {
            "timm_model_name": "convnext_atto",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 48,
        },
    },
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return folder


def images(n: int = 3) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40 + 7 * i, 55, 3)) * 255).astype(np.uint8)) for i in range(n)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_towers_by_name_equal_open_clips_model(registered, tmp_path, name):
    torch.manual_seed(0)
    saved = open_clip.create_model(name, pretrained=None)
    torch.save(saved.state_dict(), tmp_path / "weights.pt")
    reference, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(tmp_path / "weights.pt"))
    reference.eval()
    modalities = {
        m: build_modality(m, open_clip=name, pretrained=str(tmp_path / "weights.pt")) for m in ("image", "text")
    }
    ours = ContrastiveModel(modalities, CONFIGS[name]["embed_dim"])
    load_released_weights(ours)
    assert modalities["image"].quick_gelu == modalities["text"].quick_gelu == (name == "tiny-vit-quickgelu")
    assert modalities["image"].image_size == CONFIGS[name]["vision_cfg"]["image_size"]
    captions = ["a red square", "two green circles", "nothing at all"]
    with torch.no_grad():
        theirs_image = reference.encode_image(torch.stack([preprocess(i) for i in images()]), normalize=True)
        theirs_text = reference.encode_text(open_clip.get_tokenizer(name)(captions), normalize=True)
    assert torch.allclose(ours.embed("image", images()), theirs_image, atol=1e-5)  # preprocessing included
    assert torch.allclose(ours.embed("text", captions), theirs_text, atol=1e-5)


def test_quick_gelu_follows_the_weights_tag():
    assert build_modality("image", open_clip="ViT-B-32", pretrained="openai").quick_gelu  # OpenAI's: QuickGELU
    assert not build_modality("image", open_clip="ViT-B-32", pretrained="laion2b_s34b_b79k").quick_gelu
    siglip = build_modality("image", open_clip="ViT-B-16-SigLIP", pretrained="webli")
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.resize_mode == "squash"  # the tag's preprocessing
    with pytest.raises(ConfigError, match="open_clip has no model 'ViT-Q-99'"):
        build_modality("image", open_clip="ViT-Q-99")


REPO_ID = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"  # where open_clip's registry puts ViT-B-32/laion2b_s34b_b79k


def hugging_face_cache(root, state) -> None:
    """The standard cache layout: models--<org>--<name>/snapshots/<revision>/<file>, refs/main."""
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(repo / "snapshots" / revision / "open_clip_model.safetensors"),
    )


LOAD_AS_A_USER_WOULD = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO)
from safetensors.torch import load_file
from contrastive.model import ContrastiveModel
from contrastive.modalities import build_modality
from contrastive.towers import load_released_weights
towers = {m: build_modality(m, open_clip="ViT-B-32", pretrained="laion2b_s34b_b79k") for m in ("image", "text")}
model = ContrastiveModel(towers, 512)
load_released_weights(model)
released = load_file(sys.argv[1])
assert torch.equal(model.encoders["image"].conv1.weight, released["visual.conv1.weight"])
assert torch.equal(model.encoders["image"].proj, released["visual.proj"])
assert torch.equal(model.encoders["text"].token_embedding.weight, released["token_embedding.weight"])
print("towers equal the released weights")
from contrastive.distill import Distillation, DistillSettings, load_teacher
teacher = load_teacher("open_clip:ViT-B-32:laion2b_s34b_b79k")
scales = Distillation(DistillSettings(teacher="open_clip"), [("text", "image")], 512, teacher).teacher_scales
print("teacher scale", scales["text-image"])
"""


def test_a_tag_loads_offline_from_the_cache_and_an_empty_cache_stops_the_run(demo_data, tmp_path):
    assert open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].startswith(REPO_ID)
    torch.manual_seed(1)
    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    clip.logit_scale.data.fill_(math.log(97.5))  # a trained CLIP's scale, not open_clip's initial 14.3
    released = clip.state_dict()
    hugging_face_cache(tmp_path / "hub", released)
    cached = next((tmp_path / "hub").rglob("open_clip_model.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AS_A_USER_WOULD, str(cached)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "towers equal the released weights" in proc.stdout, proc.stderr[-3000:]
    assert f"loaded ViT-B-32 weights laion2b_s34b_b79k from {tmp_path / 'hub'}" in proc.stderr
    # a released teacher's distillation targets follow its own logit scale (a pair named either way)
    taught = float(proc.stdout.split("teacher scale")[1])
    assert taught == pytest.approx(clip.logit_scale.exp().item(), rel=1e-5) and taught == pytest.approx(97.5)

    towers = [
        "modality.image.open_clip=ViT-B-32",
        "modality.image.pretrained=laion2b_s34b_b79k",
        "modality.text.open_clip=ViT-B-32",
        "modality.text.pretrained=laion2b_s34b_b79k",
    ]
    common = [
        "experiment=demo",
        "debug=smoke",
        "modalities=[image,text]",
        f"data.train={demo_data / 'train'}",
        "data.eval=null",
        "trainer.threads=1",
        "model.embed_dim=512",
    ]
    empty = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    proc = run_cli("contrastive-train", *common, *towers, f"hydra.run.dir={tmp_path / 'run'}", env=empty, check=False)
    assert proc.returncode != 0
    message = [line for line in proc.stderr.splitlines() if "are not in the Hugging Face cache" in line]
    assert len(message) == 1, proc.stderr[-3000:]
    assert f"{REPO_ID}/open_clip_model.safetensors" in message[0] and str(tmp_path / "empty") in message[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first step


AUDIO = dict(clip_seconds=1.0, n_mels=32, patch_size=8, width=64, layers=2, heads=2, pre_norm=True)


def test_an_audio_tower_starts_from_an_image_vit_as_ast_did(registered, tmp_path):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(2)
    vit = open_clip.create_model("tiny-vit", pretrained=None).state_dict()
    torch.save(vit, tmp_path / "vit.pt")
    audio = build_modality("audio", **AUDIO)
    tower = audio.build_encoder(32)
    init_tower("audio", tower, audio, tmp_path / "vit.pt")
    state = tower.state_dict()
    assert torch.equal(state["patch_embed.proj.weight"], vit["visual.conv1.weight"].mean(dim=1, keepdim=True))
    assert torch.equal(state["blocks.1.attn.qkv.weight"], vit["visual.transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(state["norm_pre.weight"], vit["visual.ln_pre.weight"])
    assert torch.equal(state["head.weight"], vit["visual.proj"].T)
    # positional embeddings: the class token's kept, the 4 x 4 image grid interpolated to the spectrogram's
    grid = audio.grid
    assert state["pos_embed"].shape == (1, 1 + grid[0] * grid[1], 64) and grid != (4, 4)
    assert torch.equal(state["pos_embed"][0, 0], vit["visual.positional_embedding"][0])
    expected = (
        torch.nn.functional.interpolate(
            vit["visual.positional_embedding"][1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2),
            size=grid,
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .reshape(1, -1, 64)
    )
    assert torch.allclose(state["pos_embed"][:, 1:], expected, atol=1e-6)
    assert torch.allclose(
        state["pos_embed"],
        resample_abs_pos_embed(vit["visual.positional_embedding"][None], list(grid), [4, 4], num_prefix_tokens=1),
    )
    without = build_modality("audio", **{**AUDIO, "pre_norm": False})
    with pytest.raises(ConfigError, match="pre_norm=true"):
        init_tower("audio", without.build_encoder(32), without, tmp_path / "vit.pt")


def test_an_audio_tower_starts_from_an_ast_checkpoint(tmp_path):
    """AST's keys (module.v.*, a distillation token, a 12 x 101 grid, mlp_head) mapped; the head starts fresh."""
    audio = build_modality("audio", **{**AUDIO, "pre_norm": False})
    ours = audio.build_encoder(32).state_dict()
    torch.manual_seed(3)
    ast = {f"module.v.{k}": torch.randn_like(v) for k, v in ours.items() if not k.startswith(("head", "pos_embed"))}
    ast["module.v.pos_embed"] = torch.randn(1, 2 + 12 * 101, 64)
    ast["module.v.dist_token"] = torch.randn(1, 1, 64)
    ast["module.mlp_head.1.weight"] = torch.randn(527, 64)
    torch.save({"state_dict": ast}, tmp_path / "ast.pth")
    tower = audio.build_encoder(32)
    head_before = tower.head.weight.detach().clone()
    init_tower("audio", tower, audio, tmp_path / "ast.pth")
    state = tower.state_dict()
    assert torch.equal(state["blocks.0.mlp.fc1.weight"], ast["module.v.blocks.0.mlp.fc1.weight"])
    assert torch.equal(state["pos_embed"][0, 0], ast["module.v.pos_embed"][0, 0])  # the class token's, not dist's
    assert torch.equal(state["head.weight"], head_before)  # a fresh head into the shared space


def test_the_towers_of_one_model_build_it_once_and_load_its_weights_once(registered, tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-vit", pretrained=None).state_dict(), tmp_path / "weights.pt")
    calls = {"create_model": 0, "load_checkpoint": 0}
    for name in calls:
        real = getattr(open_clip, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(open_clip, name, counted)
    modalities = {
        m: build_modality(m, open_clip="tiny-vit", pretrained=str(tmp_path / "weights.pt")) for m in ("image", "text")
    }
    model = ContrastiveModel(modalities, 32)
    load_released_weights(model)
    # one model the two towers are taken from, one the weights are loaded into, one load
    assert calls == {"create_model": 2, "load_checkpoint": 1}
    saved = torch.load(tmp_path / "weights.pt")
    assert torch.equal(model.encoders["image"].conv1.weight, saved["visual.conv1.weight"])
    assert torch.equal(model.encoders["text"].token_embedding.weight, saved["token_embedding.weight"])
    other = ContrastiveModel({m: build_modality(m, open_clip="tiny-vit") for m in ("image", "text")}, 32)
    assert not any(p is q for p in other.parameters() for q in model.parameters())  # a new model builds anew
