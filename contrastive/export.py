"""Exported models: a self-contained directory that `load_pretrained` turns back into a model.

    export/
      model.safetensors   the towers' weights (fp32)
      config.json         embed dim, every modality's fields (preprocessing included), temperatures,
                          the tokenizer reference
      README.md           a model card: modalities, data, steps, metrics
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from contrastive.model import ContrastiveModel

FORMAT = "contrastive-export/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def export_model(
    model: ContrastiveModel,
    out_dir: str | os.PathLike,
    *,
    logit_scales: Mapping[str, float] | None = None,
    metrics: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
    prompts: list[str] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Writes `model` (weights, config, model card) to `out_dir` and returns it. `state_dict`, when
    given, holds the weights (e.g. consolidated from a ZeRO checkpoint) instead of the live module's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        **model.config(),
        "logit_scale": dict(logit_scales or {}),
        "tokenizer": _tokenizer_reference(model),
        "info": dict(info or {}),
        "metrics": dict(metrics or {}),
        "eval": {"prompts": list(prompts or [])},
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    (out / "README.md").write_text(model_card(config))
    return out


def _tokenizer_reference(model: ContrastiveModel) -> dict[str, Any]:
    refs = {}
    for name, modality in model.modalities.items():
        if hasattr(modality, "tokenizer"):
            refs[name] = {"library": "open_clip", "class": "open_clip.tokenizer.SimpleTokenizer",
                          "vocabulary": "bpe_simple_vocab_16e6 (bundled with open_clip)",
                          "context_length": getattr(modality, "context_length", None)}
    return refs


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> ContrastiveModel:
    """An exported directory -> the model in eval mode; `model.embed(modality, items)` embeds raw
    inputs (file paths, PIL images, waveforms, strings)."""
    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a contrastive export (format {config.get('format')!r})")
    model = ContrastiveModel.from_config(config["modalities"], config["embed_dim"])
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.to(device).eval()


def model_card(config: Mapping[str, Any]) -> str:
    info, metrics = config.get("info", {}), config.get("metrics", {})
    lines = [
        "# contrastive model",
        "",
        "Trained with contrastive: a multi-modal contrastive model whose towers",
        "embed each modality into one shared, L2-normalised space.",
        "",
        "```python",
        "import contrastive",
        f"model = contrastive.load_pretrained({'.'!r})",
        "emb = model.embed(\"text\", [\"the digit seven\"])",
        "```",
        "",
        "## Modalities",
        "",
        f"Embedding size: {config['embed_dim']}.",
        "",
        "| modality | settings |",
        "|---|---|",
    ]
    for name, fields in config["modalities"].items():
        lines.append(f"| {name} | " + ", ".join(f"{k}={v}" for k, v in sorted(fields.items())) + " |")
    if config.get("logit_scale"):
        lines += ["", "Logit scales: " + ", ".join(f"{k} {v:.2f}" for k, v in config["logit_scale"].items())]
    lines += ["", "## Training", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(info.items())] or ["- (no information recorded)"]
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"
