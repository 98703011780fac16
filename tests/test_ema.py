"""The weights' moving average (trainer.ema): the update rule by hand, an average that is restored
exactly from a checkpoint (2 gloo ranks, ZeRO 0 and ZeRO 2), evaluated beside the live weights, and an
export of it that scores what `eval/ema/...` said; under ZeRO-3 with a frozen tower, evaluated and
exported too."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import train

from contrastive.ema import WeightEma, ema_settings
from contrastive.errors import ConfigError

from conftest import read_jsonl, run_cli


def test_the_average_by_hand():
    model = torch.nn.Linear(2, 1)
    ema = WeightEma(model, ema_settings({"decay": 0.75, "start_step": 2, "every": 2}))
    history = []
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.add_(1.0)
        history.append(model.weight.detach().clone())
        ema.after_step(step)
    w2, w4, w6 = history[1], history[3], history[5]  # taken at steps 2 (the start), 4 and 6
    expected = 0.75 * (0.75 * w2 + 0.25 * w4) + 0.25 * w6
    assert torch.allclose(ema.shadow["weight"], expected) and ema.updates == 3
    with pytest.raises(ConfigError, match="unknown key"):
        ema_settings({"decay": 0.9, "warmup": 3})


@pytest.mark.parametrize("zero", [0, 2])
def test_the_average_resumes_exactly_and_its_export_scores_as_evaluated(demo_data, tmp_path, zero):
    ema = ["trainer.ema={decay: 0.8, every: 1}", f"engine.zero_stage={zero}", "trainer.max_steps=6"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    # the uninterrupted run leaves a checkpoint at step 3; another run directory resumes from it
    train("torchrun", demo_data, whole, *ema, "trainer.save_every=3")
    step3 = whole / "checkpoints" / "step_00000003"
    assert (step3 / "ema.safetensors").exists()
    train("torchrun", demo_data, split, *ema, f"resume={step3}")
    a = load_file(str(whole / "checkpoints" / "step_00000006" / "ema.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_00000006" / "ema.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    if zero:
        return
    # evaluated beside the live weights, and exported with --ema: the same figures
    run_dir = tmp_path / "evaluated"
    train(
        "single",
        demo_data,
        run_dir,
        *ema,
        "trainer.ema={decay: 0.8, every: 1, export: true}",
        f"data.eval={demo_data / 'heldout'}",
        "export=true",
    )
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert "eval/ema/retrieval/image->audio/R@1" in final and "eval/retrieval/image->audio/R@1" in final
    assert json.loads((run_dir / "export" / "config.json").read_text())["info"]["weights"] == "ema"
    run_cli(
        "contrastive-eval",
        str(run_dir / "export"),
        "--data",
        str(demo_data / "heldout"),
        "--json",
        str(tmp_path / "e.json"),
    )
    scored = json.loads((tmp_path / "e.json").read_text())
    for key in ("retrieval/image->audio/R@1", "retrieval/text->image/R@5", "zero_shot/audio->text/acc"):
        assert scored[key] == pytest.approx(final[f"eval/ema/{key}"], abs=1e-6), key


def test_under_zero3_with_a_frozen_tower_the_average_evaluates_and_exports(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    train(
        "torchrun",
        demo_data,
        run_dir,
        "engine.zero_stage=3",
        "trainer.ema={decay: 0.8, every: 1}",
        "+model.towers.text={freeze: true}",
        "trainer.max_steps=4",
        f"data.eval={demo_data / 'heldout'}",
        "eval.max_samples=64",
    )
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert "eval/ema/retrieval/image->text/R@1" in final
    shadow = load_file(str(run_dir / "checkpoints" / "step_00000004" / "ema.safetensors"))
    assert shadow and not any(k.startswith("encoders.text.") for k in shadow)  # frozen: never averaged
    run_cli("contrastive-export", str(run_dir), str(tmp_path / "export"), "--ema")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert torch.equal(exported["encoders.image.conv1.weight"], shadow["encoders.image.conv1.weight"])
    assert exported["encoders.text.token_embedding.weight"].numel() > 0  # the frozen tower, whole
