"""The MFU's two halves: the towers' FLOPs per sample and the device's peak."""

import logging

import torch

from contrastive import flops
from contrastive.builders import build_modalities
from contrastive.model import ContrastiveModel


def test_training_flops_are_forward_and_backward_of_every_matmul():
    width, layers, patch, size = 64, 2, 8, 32
    mods = build_modalities(
        ["image", "text"],
        {
            "image": dict(image_size=size, patch_size=patch, width=width, layers=layers, head_width=32),
            "text": dict(context_length=16, width=64, heads=2, layers=2),
        },
    )
    model = ContrastiveModel(mods, embed_dim=16)
    tokens = (size // patch) ** 2 + 1
    # forward + backward (2x forward: input and weight gradients) of every matmul. Per layer: qkv and
    # out projections (4 w^2) and the MLP (8 w^2) on every token, attention's two T x T x w products;
    # then the projection of the class token. The patch embedding sees the pixels, which need no
    # gradient: forward + weight gradient only.
    matmuls = layers * (2 * tokens * 12 * width**2 + 4 * tokens**2 * width) + 2 * width * 16
    patch_embedding = 2 * (tokens - 1) * 3 * patch**2 * width
    counted = flops.training_flops_per_sample(model)["image"]
    assert abs(counted / (3 * matmuls + 2 * patch_embedding) - 1) < 0.005, (counted, 3 * matmuls + 2 * patch_embedding)


def test_cpu_peak_is_measured_in_the_precision_the_matmuls_run_in():
    fp32, source = flops.peak_flops(torch.device("cpu"), "fp32")
    assert fp32 > 1e8 and source == "measured CPU fp32 matmul"
    bf16, source = flops.peak_flops(torch.device("cpu"), "amp_bf16")
    assert bf16 > 1e7 and source.startswith("measured CPU") and "bf16" in source


def test_bf16_slower_than_fp32_on_this_cpu_is_a_warning(monkeypatch, caplog):
    speeds = {torch.float32: 80e9, torch.bfloat16: 20e9}
    monkeypatch.setattr(flops, "measured_cpu_peak", lambda dtype=torch.float32: speeds[dtype])
    with caplog.at_level(logging.WARNING, logger="contrastive.flops"):
        peak, source = flops.peak_flops(torch.device("cpu"), "bf16")
    assert peak == 80e9 and source == "measured CPU fp32 matmul; bf16 ran at 0.25x that"  # what the CPU can do
    assert "trainer.precision=bf16" in caplog.text and "0.25x" in caplog.text and "fp32 trains faster" in caplog.text
    caplog.clear()
    speeds[torch.bfloat16] = 200e9  # a CPU with bf16 instructions: no warning
    with caplog.at_level(logging.WARNING, logger="contrastive.flops"):
        peak, source = flops.peak_flops(torch.device("cpu"), "bf16")
    assert peak == 200e9 and source == "measured CPU bf16 matmul, 2.5x fp32's" and not caplog.text
