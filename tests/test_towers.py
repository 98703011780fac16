"""Tower control: freezing (all, or all but the last blocks), initialising from our export or from
an open_clip checkpoint, activation checkpointing giving the same gradients."""

from __future__ import annotations

import open_clip
import pytest
import torch

from contrastive.builders import build_objective
from contrastive.export import export_model
from contrastive.modalities import ConfigError
from contrastive.towers import apply_tower_settings, freeze_tower

from datasets import TINY, tiny_modalities


def objective(seed=0, names=("image", "audio", "text")):
    torch.manual_seed(seed)
    return build_objective(tiny_modalities(names), embed_dim=16)


def trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_freeze_all_and_unlock_last_blocks():
    obj = objective()
    image, audio = obj.model.encoders["image"], obj.model.encoders["audio"]
    freeze_tower("image", image, 0)
    assert trainable(image) == set()
    freeze_tower("image", image, 1)
    assert trainable(image) == {
        n for n, _ in image.named_parameters() if n.startswith(("transformer.resblocks.1.", "ln_post.", "proj"))
    }
    freeze_tower("audio", audio, 1)  # timm's ViT: blocks, then norm and head
    assert trainable(audio) == {
        n for n, _ in audio.named_parameters() if n.startswith(("blocks.1.", "norm.", "fc_norm.", "head."))
    }
    assert trainable(obj.model.encoders["text"])  # other towers untouched


def test_init_from_our_export_and_from_open_clip(tmp_path):
    source = objective(seed=1)
    export_model(source.model, tmp_path / "export")
    clip = open_clip.CLIP(
        16,
        open_clip.model.CLIPVisionCfg(**source.model.modalities["image"].open_clip_vision_cfg),
        open_clip.model.CLIPTextCfg(**source.model.modalities["text"].open_clip_text_cfg),
    )
    torch.save(clip.state_dict(), tmp_path / "open_clip.pt")

    target = objective(seed=2)
    apply_tower_settings(
        target.model,
        {
            "audio": {"init": str(tmp_path / "export")},
            "image": {"init": str(tmp_path / "open_clip.pt"), "freeze": True},
            "text": {"init": str(tmp_path / "open_clip.pt")},
        },
    )
    for k, v in source.model.encoders["audio"].state_dict().items():
        assert torch.equal(target.model.encoders["audio"].state_dict()[k], v)
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(target.model.encoders["image"].state_dict()[k], v)
    assert torch.equal(target.model.encoders["text"].token_embedding.weight, clip.token_embedding.weight)
    assert trainable(target.model.encoders["image"]) == set()


def test_tower_errors_are_named(tmp_path):
    obj = objective()
    with pytest.raises(ConfigError, match=r"model.towers.image: unknown key\(s\) \['frozen'\]"):
        apply_tower_settings(obj.model, {"image": {"frozen": True}})
    with pytest.raises(ConfigError, match="model.towers.depth: no such tower"):
        apply_tower_settings(obj.model, {"depth": {"freeze": True}})
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="does not fit the image tower"):
        apply_tower_settings(obj.model, {"image": {"init": str(tmp_path / "wrong.pt")}})


# compile through dynamo with the eager backend: the wiring is real, without inductor's build time
@pytest.mark.parametrize(
    "setting", [{"grad_checkpointing": True}, {"compile": {"backend": "eager"}}], ids=["grad_checkpointing", "compile"]
)
def test_tower_settings_give_the_same_gradients(setting):
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": torch.randint(1, 100, (4, 16)),
        "audio": torch.randn(4, *tiny_modalities(("audio",))["audio"].empty().shape),
        "mask": {m: torch.ones(4, dtype=torch.bool) for m in TINY},
    }
    grads = []
    for applied in (False, True):
        obj = objective()
        if applied:
            apply_tower_settings(obj.model, {m: dict(setting) for m in TINY})
        loss, _ = obj(batch)
        loss.backward()
        grads.append({n: p.grad for n, p in obj.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()  # parameter names (checkpoints, exports) unchanged
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    if "compile" in setting:
        assert all(obj.model.encoders[m]._compiled_call_impl is not None for m in TINY)


TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TIMM_TOWERS = {  # open_clip configs of towers timm builds, as a user registers them
    "tiny-resnet": {"timm_model_name": "resnet18", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
    "tiny-convnext": {"timm_model_name": "convnext_atto", "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
}


@pytest.mark.parametrize("name", sorted(TIMM_TOWERS))
def test_layer_decay_of_a_timm_tower_groups_its_layers_as_timm_does(tmp_path, name):
    import json

    from timm.optim import param_groups_layer_decay

    from contrastive.builders import build_objective
    from contrastive.modalities import build_modality
    from contrastive.towers import layer_scales

    cfg = {"embed_dim": 16, "vision_cfg": {**TIMM_TOWERS[name], "timm_model_pretrained": False}, "text_cfg": TINY_TEXT}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    image = build_modality("image", open_clip=name)
    obj = build_objective({"image": image, "text": build_modality("text", open_clip=name)}, embed_dim=16)
    ours = layer_scales(obj.model, {"image": {"layer_decay": 0.7, "lr_scale": 0.5}})
    trunk = obj.model.encoders["image"].trunk
    theirs = {id(p): g["lr_scale"] for g in param_groups_layer_decay(trunk, layer_decay=0.7) for p in g["params"]}
    assert len(theirs) == sum(1 for _ in trunk.parameters()) and len(set(theirs.values())) > 4
    for p in trunk.parameters():
        assert ours[id(p)] == ("image", pytest.approx(0.5 * theirs[id(p)])), [
            n for n, q in trunk.named_parameters() if q is p
        ]
    head = [p for n, p in obj.model.encoders["image"].named_parameters() if n.startswith("head.")]
    assert head and all(ours[id(p)] == ("image", 0.5) for p in head)  # the projection after the trunk: the top


def test_a_modified_resnet_decays_by_bottleneck_across_its_stages():
    """open_clip's own ResNet (RN50's kind): every bottleneck of layer1..layer4 is a layer of its own."""
    from open_clip.modified_resnet import Bottleneck, ModifiedResNet

    from contrastive.towers import layers

    tower = ModifiedResNet(layers=[1, 2, 2, 1], output_dim=16, heads=2, image_size=64, width=8)
    depth, top = layers(tower)
    bottlenecks = [m for m in tower.modules() if isinstance(m, Bottleneck)]
    assert top == len(bottlenecks) + 1 == 7
    assert [depth[id(next(b.parameters()))] for b in bottlenecks] == [1, 2, 3, 4, 5, 6]
    assert depth[id(tower.conv1.weight)] == 0 and depth[id(tower.attnpool.c_proj.weight)] == top


def test_hand_written_towers_are_the_ones_open_clips_clip_builds_for_their_config():
    """Built through open_clip's public transformer classes: the same seed gives the same weights as
    open_clip's own CustomTextCLIP (visual first, then text) for the same configs."""
    from contrastive.modalities import build_modality
    from contrastive.pretrained import text_transformer, vision_transformer

    vision, text = build_modality("image").open_clip_vision_cfg, build_modality("text").open_clip_text_cfg
    for quick_gelu in (False, True):
        torch.manual_seed(0)
        ours = [
            vision_transformer(32, vision, quick_gelu=quick_gelu),
            text_transformer(32, text, quick_gelu=quick_gelu),
        ]
        torch.manual_seed(0)
        clip = open_clip.CustomTextCLIP(32, vision, text, quick_gelu=quick_gelu)
        for mine, theirs in zip(ours, (clip.visual, clip.text)):
            assert repr(mine) == repr(theirs)
            assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))


def test_patch_dropout_in_the_audio_and_image_towers_and_its_unmasked_end(demo_data, tmp_path):
    from contrastive.flops import training_flops_per_sample
    from contrastive.modalities import build_modality
    from contrastive.model import ContrastiveModel
    from contrastive.towers import unmask

    from conftest import run_cli, tiny_overrides

    mods = {m: build_modality(m, **{**TINY[m], "patch_dropout": 0.5}) for m in ("image", "audio")}
    torch.manual_seed(0)
    model = ContrastiveModel(mods, 16)
    masked = training_flops_per_sample(model)
    whole = training_flops_per_sample(model, unmasked=True)
    plain = training_flops_per_sample(ContrastiveModel({m: build_modality(m, **TINY[m]) for m in mods}, 16))
    assert whole == plain  # every token
    for m in mods:  # the kept half of the patches (and the class token) through every block
        assert 0.45 < masked[m] / whole[m] < 0.7, (m, masked[m], whole[m])
    x = {m: torch.randn(2, *mods[m].empty().shape) for m in mods}
    model.eval()
    assert torch.equal(model.encode("audio", x["audio"]), model.encode("audio", x["audio"]))  # no dropout in eval
    model.train()
    assert not torch.equal(model.encode("audio", x["audio"]), model.encode("audio", x["audio"]))
    assert unmask(model) == 2 and unmask(model) == 0
    assert torch.equal(model.encode("audio", x["audio"]), model.encode("audio", x["audio"]))

    run_dir = tmp_path / "run"
    proc = run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data, run_dir, "modality.audio.patch_dropout=0.5", "trainer.unmasked_steps=2", "export=false"
        ),
    )
    assert "patch dropout off for the last 2 steps" in proc.stdout + proc.stderr
