"""A loss is one file: this test file alone defines and registers a third pair loss, decoupled
contrastive learning (DCL: InfoNCE without the positive in the denominator, Yeh et al. 2022), with a
setting of its own, and trains it through the real CLI with no edit under contrastive/. The CLI
finds it through `imports=[test_third_loss]`, which makes `loss=dcl` a config option. A setting the
chosen loss does not take is refused with its name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from contrastive.distributed import gather_no_grad, gather_with_grad, rank
from contrastive.loss import LossSettings, PairLoss, Temperature, info_nce, register_loss
from contrastive.loss.infonce import NEG, dead_columns

from conftest import REPO, read_jsonl, run_cli, tiny_overrides


@dataclass
class DCLSettings(LossSettings):
    exclude_positive: bool = True  # false: the positive stays in the denominator, which is InfoNCE


@register_loss("dcl")
class DecoupledContrastive(PairLoss):
    settings = DCLSettings

    def __init__(self, settings: DCLSettings, temperature):
        super().__init__(settings, temperature)
        self.exclude_positive = settings.exclude_positive

    def forward(self, a, b, valid, label_ids=None):
        all_a, all_b = gather_with_grad(a.float()), gather_with_grad(b.float())
        all_valid = gather_no_grad(valid)
        all_labels = gather_no_grad(label_ids) if label_ids is not None else None
        targets = torch.arange(a.shape[0]) + rank() * a.shape[0]
        scale = self.scale()
        total = 0.0
        for rows, cols in ((a.float(), all_b), (b.float(), all_a)):
            logits = scale * rows @ cols.T
            positive = logits[torch.arange(len(rows)), targets]
            dead = dead_columns(all_valid, label_ids, all_labels, targets, 0).expand(len(rows), -1).clone()
            if self.exclude_positive:
                dead[torch.arange(len(rows)), targets] = True
            total = total + (torch.logsumexp(logits.masked_fill(dead, NEG), dim=1) - positive)
        return (total * valid).sum() / (2 * all_valid.sum().clamp(min=1))


def test_dcl_with_the_positive_kept_is_infonce():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(2))
    valid = torch.tensor([True, True, False, True, True, True])
    kept = DecoupledContrastive(DCLSettings(exclude_positive=False), Temperature())
    assert kept(a, b, valid).item() == pytest.approx(info_nce(a, b, valid, kept.scale()).item(), rel=1e-6)
    assert DecoupledContrastive(DCLSettings(), Temperature())(a, b, valid).item() < kept(a, b, valid).item()


def test_a_loss_defined_in_a_test_file_trains_through_the_cli(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            run_dir,
            "imports=[test_third_loss]",
            "loss=dcl",
            "modalities=[image,text]",
            "trainer.max_steps=40",
            "optim.scheduler.warmup_steps=2",
            "optim.grad_clip=1.0",  # 40 steps: clipping learns faster in a run's first ~150 (benchmarks/README.md)
            "export=false",
            "data.eval=null",
        ),
        env={"PYTHONPATH": str(REPO / "tests")},
    )
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.3, losses
    config = (run_dir / "config.yaml").read_text()
    assert "name: dcl" in config and "exclude_positive: true" in config


@pytest.mark.parametrize("override", ["loss.tile_size=8", "+loss.tile_size=8"])
def test_a_setting_the_chosen_loss_does_not_take_is_refused_with_its_name(demo_data, tmp_path, override):
    proc = run_cli(
        "contrastive-train", *tiny_overrides(demo_data, tmp_path / "run", "loss=siglip", override), check=False
    )
    assert proc.returncode != 0
    assert "tile_size" in proc.stderr and "SigLIPSettings" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
