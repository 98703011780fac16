"""Exported models: a self-contained directory that `load_pretrained` turns back into a model.

export/
  model.safetensors   the towers' weights (fp32)
  config.json         embed dim, every modality's fields (preprocessing included), temperatures,
                      the tokenizer reference
  README.md           a model card: modalities, data, steps, metrics
  open_clip/          the image and text towers in open_clip's format (when both are trained)
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from contrastive.credentials import redact
from contrastive.model import ContrastiveModel, ContrastiveObjective

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
    if {"image", "text"} <= set(model.modalities):
        export_open_clip(
            model, state, out / "open_clip", logit_scale=dict(logit_scales or {}).get("image-text", 1 / 0.07)
        )
    return out


OPEN_CLIP_NAME = "contrastive-image-text"


def export_open_clip(
    model: ContrastiveModel, state: Mapping[str, torch.Tensor], out_dir: Path, *, logit_scale: float
) -> Path:
    """The image and text towers in open_clip's own format, loadable by open_clip alone:

    open_clip.create_model_and_transforms("local-dir:<out_dir>")
    open_clip.add_model_config("<out_dir>/contrastive-image-text.json")
    open_clip.create_model_and_transforms("contrastive-image-text", pretrained="<out_dir>/open_clip_model.safetensors")
    """
    image, text = model.modalities["image"], model.modalities["text"]
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name, modality in (("image", image), ("text", text)):
        prefix = f"encoders.{name}."
        weights.update(modality.to_open_clip({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}))
    weights["logit_scale"] = torch.tensor(math.log(logit_scale))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "open_clip_model.safetensors"))
    model_cfg: dict[str, Any] = {
        "embed_dim": model.embed_dim,
        "vision_cfg": dict(image.open_clip_vision_cfg),
        "text_cfg": dict(text.open_clip_text_cfg),
    }
    if image.quick_gelu or text.quick_gelu:
        model_cfg["quick_gelu"] = True
    if text.custom_text:
        model_cfg["custom_text"] = True
    preprocess = {
        "size": image.image_size,
        "mean": list(image.mean),
        "std": list(image.std),
        "interpolation": image.interpolation,
        "resize_mode": image.resize_mode,
    }
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n"
    )
    (out_dir / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
    return out_dir


def _tokenizer_reference(model: ContrastiveModel) -> dict[str, Any]:
    refs = {}
    for name, modality in model.modalities.items():
        if hasattr(modality, "tokenizer"):
            refs[name] = {
                "library": "open_clip",
                "class": "open_clip.tokenizer.SimpleTokenizer",
                "vocabulary": "bpe_simple_vocab_16e6 (bundled with open_clip)",
                "context_length": getattr(modality, "context_length", None),
            }
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


def objective_from_checkpoint(checkpoint: str | os.PathLike) -> tuple[ContrastiveObjective, dict[str, Any]]:
    """The model and loss a training checkpoint holds (ZeRO partitions and mixed-precision master
    weights gathered into fp32), in eval mode, and the checkpoint's record (contrastive.json)."""
    from contrastive.builders import build_loss, build_modalities, import_modules
    from contrastive.checkpoint import read_meta
    from contrastive.ds_checkpoint import consolidated_state_dict
    from contrastive.towers import apply_structure

    meta = read_meta(checkpoint)
    cfg = meta["config"]
    import_modules(cfg.get("imports", []))
    modalities = build_modalities(cfg["modalities"], cfg["modality"])
    model = ContrastiveModel(modalities, cfg["model"]["embed_dim"])
    apply_structure(model, cfg["model"].get("towers") or {})  # LoRA adapters, as trained
    objective = ContrastiveObjective(model, build_loss(list(modalities), cfg["loss"]))
    # the distillation's projections trained beside the model; the export is the model alone
    state = {k: v for k, v in consolidated_state_dict(checkpoint).items() if not k.startswith("distill.")}
    objective.load_state_dict(state)
    return objective.eval(), meta


OPEN_CLIP = "open_clip:"


def exported_scales(path: str | os.PathLike) -> dict[str, float]:
    """An export's logit scale per pair (`config.json`), {} for anything else."""
    config = Path(path) / CONFIG
    return json.loads(config.read_text()).get("logit_scale", {}) if config.exists() else {}


def load_model_spec(spec: str) -> tuple[ContrastiveModel, dict[str, float]]:
    """(the model `spec` names, frozen and in eval mode; its logit scale per pair where known). `spec`:
    an export directory, a checkpoint or run directory (its latest checkpoint), or
    `open_clip:<name>:<tag>` (a released open_clip model's image and text towers)."""
    if spec.startswith(OPEN_CLIP):
        from contrastive.modalities import build_modality
        from contrastive.pretrained import model_config, released_logit_scale
        from contrastive.towers import load_released_weights

        name, _, tag = spec[len(OPEN_CLIP) :].partition(":")
        modalities = {m: build_modality(m, open_clip=name, pretrained=tag or None) for m in ("image", "text")}
        model = ContrastiveModel(modalities, model_config(name)["embed_dim"])
        load_released_weights(model)
        # the released model's own scale; without weights, the scale open_clip initialises (1 / 0.07)
        quick = modalities["image"].quick_gelu
        scale = released_logit_scale(name, tag, quick_gelu=quick, where=spec) if tag else 1 / 0.07
        return model.requires_grad_(False).eval(), {"image-text": scale}
    path = Path(spec)
    if (path / CONFIG).exists():
        return load_pretrained(path).requires_grad_(False).eval(), exported_scales(path)
    from contrastive.checkpoint import resolve_resume

    objective, _ = objective_from_checkpoint(resolve_resume(spec, path))
    scales = {n: float(s) for n, s in objective.loss.scales().items()}
    return objective.model.requires_grad_(False).eval(), scales


def exported_metrics(metrics: Mapping[str, float], *, ema: bool) -> dict[str, float]:
    """The checkpoint's final figures for the weights exported: the live weights' `eval/...`, or the
    average's `eval/ema/...`."""
    if ema:
        return {k.removeprefix("eval/ema/"): v for k, v in metrics.items() if k.startswith("eval/ema/")}
    return {k.removeprefix("eval/"): v for k, v in metrics.items() if not k.startswith("eval/ema/")}


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, ema: bool = False) -> Path:
    """A training checkpoint -> an export directory: what training writes at its end and what
    `contrastive-export` writes, the same bytes for the same checkpoint. With `ema`, the model's
    weights are the checkpoint's average of them (trainer.ema; contrastive.ema)."""
    from contrastive.towers import merge_lora

    objective, meta = objective_from_checkpoint(checkpoint)
    if ema:
        from safetensors.torch import load_file

        from contrastive.ema import EMA_FILE

        averaged = Path(checkpoint) / EMA_FILE
        if not averaged.exists():
            raise FileNotFoundError(f"{checkpoint} holds no weights' average ({EMA_FILE}): train with trainer.ema")
        objective.model.load_state_dict({**objective.model.state_dict(), **load_file(str(averaged))})
    merge_lora(objective.model)  # the plain towers' keys, adapters folded in: loadable anywhere
    cfg, state = meta["config"], meta["state"]
    layout = meta.get("data_layout", {})
    info = {
        "steps": meta["step"],
        # redacted again: a checkpoint written before credentials were redacted may hold one
        "train_data": redact(cfg["data"]["train"]),
        "eval_data": redact(cfg["data"]["eval"]),
        "global_batch_size": cfg["data"]["batch_size"] * layout.get("world_size", 1) * cfg["trainer"]["accumulate"],
        "epochs_seen": state["position"]["epoch"],
        "samples_seen": state["counts"].get("samples", 0),
        "zero_stage": cfg["engine"]["zero_stage"],
        "weights": "ema" if ema else "live",
        "precision": cfg["trainer"]["precision"],
    }
    with torch.no_grad():
        scales = {name: float(scale) for name, scale in objective.loss.scales().items()}
    return export_model(
        objective.model,
        out_dir,
        logit_scales=scales,
        info=info,
        prompts=list(cfg["eval"]["prompts"]),
        metrics=exported_metrics(meta.get("metrics", {}), ema=ema),
    )


HUB_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def export_hub(export_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An export's image and text towers in open_clip's `hf-hub:` layout: `open_clip_config.json`,
    `open_clip_model.safetensors` and a model card (README.md) with open_clip's front matter, the
    image and text towers' settings and their headline figures. Uploaded as it is (`hf upload
    ORG/NAME OUT`), it loads with `open_clip.create_model_and_transforms("hf-hub:ORG/NAME")`."""
    export, out = Path(export_dir), Path(out_dir)
    if not (export / "open_clip" / HUB_FILES[1]).exists():
        raise ValueError(f"{export} has no image and text towers: open_clip's hub layout holds those two")
    out.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES:
        (out / name).write_bytes((export / "open_clip" / name).read_bytes())
    (out / "README.md").write_text(hub_card(json.loads((export / CONFIG).read_text())))
    return out


def headline(metrics: Mapping[str, float], modalities: set[str] | None = None) -> list[str]:
    """The evaluation's headline figures as a markdown table, one row a direction: zero-shot top-1 and
    top-5, retrieval R@1/R@5/R@10 (every figure stays in config.json). `modalities`: only directions
    between these."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        found = re.fullmatch(r"(?:(\w+)/)?(zero_shot|retrieval)/(\w+)->(\w+)/(acc|top5|R@1|R@5|R@10)", key)
        if found and (modalities is None or {found.group(3), found.group(4)} <= modalities):
            where = f"{found.group(1)}: " if found.group(1) else ""
            name = f"{where}{found.group(2).replace('_', '-')} {found.group(3)}->{found.group(4)}"
            rows.setdefault(name, {})[found.group(5)] = value
    columns = ["acc", "top5", "R@1", "R@5", "R@10"]
    shown = [c for c in columns if any(c in r for r in rows.values())]
    if not rows:
        return []
    head = ["| | " + " | ".join({"acc": "top-1", "top5": "top-5"}.get(c, c) for c in shown) + " |"]
    head.append("|---|" + "---|" * len(shown))
    body = [
        f"| {n} | " + " | ".join(f"{r[c]:.1%}" if c in r else "" for c in shown) + " |" for n, r in sorted(rows.items())
    ]
    return head + body


def hub_card(config: Mapping[str, Any]) -> str:
    """The model card of the hub layout: what the folder holds (the image and text towers) and how
    open_clip loads it."""
    front = "---\nlibrary_name: open_clip\npipeline_tag: zero-shot-image-classification\n"
    front += "tags:\n- clip\n- contrastive\n---\n\n"
    towers = ("image", "text")
    lines = [
        "# contrastive model: image and text towers",
        "",
        "Trained with contrastive; the image and text towers in open_clip's layout.",
        "",
        "```python",
        "import open_clip",
        'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:ORG/NAME")',
        'tokenizer = open_clip.get_tokenizer("hf-hub:ORG/NAME")',
        "```",
        "",
        f"Embedding size: {config['embed_dim']}."
        + (
            ""
            if set(config["modalities"]) <= set(towers)
            else f" The run trained {', '.join(config['modalities'])}: the other towers are in its full export"
            " (`contrastive.load_pretrained(export_dir)`), not in this folder."
        ),  # fmt: skip
    ]
    table = headline(config.get("metrics", {}), set(towers))
    if table:
        lines += ["", "## Evaluation", "", *table]
    return front + "\n".join(lines) + "\n"


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
        'emb = model.embed("text", ["the digit seven"])',
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
    table = headline(metrics)
    if table:
        lines += ["", "## Evaluation", "", *table, "", "Every figure of the evaluation is in config.json (`metrics`)."]
    return "\n".join(lines) + "\n"
