"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from contrastive.builders import build_objective, build_optimizer
from contrastive.optim import warmup_cosine

from datasets import tiny_modalities


def groups(**kwargs):
    torch.manual_seed(0)
    objective = build_objective(tiny_modalities(("image", "audio", "text")), embed_dim=16)
    names = {id(p): n for n, p in objective.named_parameters()}
    opt, _ = build_optimizer(
        objective,
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1),
        scheduler=None,
        total_steps=10,
        **kwargs,
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}, set(names.values())


def test_no_decay_on_biases_norms_embeddings_temperatures():
    decay, no_decay, every = groups()
    assert decay | no_decay == every and not decay & no_decay
    assert decay, "weight matrices decay"
    for name in decay:
        assert name.endswith(("weight", "proj", "projection", "in_proj_weight")), name
        assert not any(k in name for k in ("bias", "ln", "norm", "embedding", "logit_scale")), name
    for must in (
        "model.encoders.text.token_embedding.weight",
        "model.encoders.text.positional_embedding",
        "model.encoders.image.class_embedding",
        "model.encoders.image.positional_embedding",
    ):
        assert must in no_decay
    assert any("logit_scale" in n for n in no_decay) and any(n.endswith("bias") for n in no_decay)
    assert any(".ln_" in n for n in no_decay)


def test_open_clip_grouping_decays_embeddings():
    decay, no_decay, _ = groups(no_decay=["logit_scale"])
    # open_clip's trainer: every tensor of 2+ dims decays but the logit scale
    assert "model.encoders.text.token_embedding.weight" in decay
    assert "model.encoders.image.positional_embedding" in decay
    assert "model.encoders.image.class_embedding" in no_decay  # 1-D


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0.1
