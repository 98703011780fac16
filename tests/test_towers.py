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
