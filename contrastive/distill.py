"""Distillation from a frozen teacher (`distill={teacher: ..., weight: 1.0, kind: logits, temperature: 1.0}`).

The teacher embeds the same batch as the student, for the modalities it has (a tower the student has
and the teacher lacks is not distilled), and the student learns to match it:
- `logits`: for each of the loss's pairs the teacher has, the student's similarity distribution over
  the global batch follows the teacher's: cross-entropy with the teacher's softmax as the target
  (KL up to a constant; TinyCLIP's and open_clip's distillation), each side's cosines times its
  own logit scale over `temperature`, both directions;
- `features`: each student embedding moves toward the teacher's (1 - cosine), through a learned
  projection when the sizes differ;
- `both`: the sum.
It is exact across ranks as the contrastive loss is: each rank's rows against every rank's columns.

The teacher is never part of the trained module (no optimizer state, never sharded by ZeRO): it runs
under no_grad, in bf16 on GPUs. It is a model (an export, a run's checkpoint, or `open_clip:<name>:
<tag>`, which must take the student's inputs: the same preprocessing), or `features:<dir>`: its
embeddings precomputed once by `contrastive-embed embed` (the teacher's export, the training set),
looked up by sample key, so that distillation costs no teacher compute per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.distributed import gather_no_grad, gather_with_grad, world_size
from contrastive.errors import ConfigError

KINDS = ("logits", "features", "both")
FEATURES = "features:"


@dataclass
class DistillSettings:
    """`distill.*`: off without a teacher."""

    teacher: Optional[str] = None  # an export | a checkpoint or run dir | open_clip:<name>:<tag> | features:<dir>
    weight: float = 1.0  # the distillation term's weight beside the contrastive loss
    kind: str = "logits"  # logits | features | both
    temperature: float = 1.0  # divides both models' logits in the `logits` term
    # the teacher's logit scale for every pair, when the teacher does not say (its own is used otherwise:
    # an export's config.json, a checkpoint's temperatures, a released open_clip model's logit_scale)
    teacher_scale: Optional[float] = None


class Teacher:
    """What the teacher says about a batch: {modality: [n, d] unit embeddings, mask [n]} for the
    modalities it has, and its logit scale per pair. A plain object, not a module."""

    def __init__(self, model: Any = None, features: Mapping[str, Any] | None = None, scales=None):
        self.model, self.features = model, features
        # a pair's scale under either order of its name ("image-text" is "text-image")
        self.scales = {}
        for name, scale in dict(scales or {}).items():
            a, _, b = name.partition("-")
            self.scales[name] = self.scales[f"{b}-{a}"] = float(scale)
        self.modalities = list(model.encoders) if model is not None else list(features)
        self._on: torch.device | None = None

    @torch.no_grad()
    def embed(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for name in (n for n in names if n in self.modalities):
            if self.model is not None:
                device = batch[name].device
                if self._on != device:
                    self.model.to(device).eval()
                    self._on = device
                half = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nothing()
                with half:
                    out[name] = (self.model.encode(name, batch[name]).float(), batch["mask"][name])
            else:
                rows, table = self.features[name]
                index = [rows.get(k, -1) if k else -1 for k in batch["__key__"]]
                found = torch.tensor([i >= 0 for i in index], dtype=torch.bool)
                device = batch["mask"][name].device
                emb = table[torch.tensor([max(i, 0) for i in index])].to(device)
                out[name] = (emb, batch["mask"][name] & found.to(device))
        return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load_teacher(spec: str) -> Teacher:
    """The teacher `spec` names (see the module docstring)."""
    if spec.startswith(FEATURES):
        from contrastive.embed import load_embeddings
        from contrastive.export import exported_scales

        where = Path(spec[len(FEATURES) :])
        made = json.loads((where / "embed.json").read_text())
        features = {}
        for name in made["modalities"]:
            array, keys, _ = load_embeddings(where, name)
            features[name] = ({k: i for i, k in enumerate(keys)}, torch.from_numpy(array).float())
        # the scales contrastive-embed stored beside the features (an embed.json of before them: the export's)
        scales = made["logit_scale"] if "logit_scale" in made else exported_scales(made["model"])
        return Teacher(features=features, scales=scales)
    from contrastive.export import load_model_spec

    model, scales = load_model_spec(spec)
    return Teacher(model=model, scales=scales)


def check_inputs(teacher: Teacher, student: Mapping[str, Any]) -> None:
    """A live teacher reads the student's input tensors: each shared modality's must have its shape."""
    if teacher.model is None:
        return
    for name in set(teacher.modalities) & set(student):
        mine, theirs = tuple(student[name].empty().shape), tuple(teacher.model.modalities[name].empty().shape)
        if mine != theirs:
            raise ConfigError(
                f"distill.teacher: its {name} input is {theirs}, the student's {mine}: a live teacher reads the "
                "student's batch, so both need the same preprocessing; or precompute the teacher's features "
                "(contrastive-embed embed TEACHER --data TRAIN --out DIR, then distill.teacher=features:DIR)"
            )


class Distillation(nn.Module):
    """The distillation term of the objective. Its only parameters are the feature projections."""

    def __init__(self, settings: DistillSettings, pairs: Sequence[tuple[str, str]], embed_dim: int, teacher: Teacher):
        super().__init__()
        if settings.kind not in KINDS:
            raise ConfigError(f"distill.kind: expected one of {KINDS}, got {settings.kind!r}")
        self.settings, self.teacher = settings, teacher
        self.pairs = [p for p in pairs if p[0] in teacher.modalities and p[1] in teacher.modalities]
        given = settings.teacher_scale
        self.teacher_scales = {f"{a}-{b}": given or teacher.scales.get(f"{a}-{b}") for a, b in self.pairs}
        unknown = [name for name, scale in self.teacher_scales.items() if not scale]
        if settings.kind != "features" and unknown:
            raise ConfigError(
                f"distill.teacher={settings.teacher}: its logit scale for {unknown} is unknown (the teacher's "
                "softmax targets follow it: a released CLIP's is ~100); set distill.teacher_scale"
            )
        self.projections = nn.ModuleDict()
        if settings.kind != "logits":
            dims = teacher_dims(teacher)
            for name, dim in dims.items():
                if dim != embed_dim:
                    self.projections[name] = nn.Linear(embed_dim, dim, bias=False)

    def forward(
        self, embeddings: Mapping[str, torch.Tensor], batch: Mapping[str, Any], scales: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(this rank's share of the weighted term, metrics); `scales`: the student's logit scale per pair."""
        said = self.teacher.embed(batch, list(embeddings))
        total = torch.zeros((), device=next(iter(embeddings.values())).device)
        logs: dict[str, torch.Tensor] = {}
        if self.settings.kind in ("logits", "both"):
            for a, b in self.pairs:
                name = f"{a}-{b}"
                term = self.logits_term(embeddings[a], embeddings[b], said[a], said[b], scales[name], name)
                total = total + term
                logs[f"distill/logits/{name}"] = term.detach()
        if self.settings.kind in ("features", "both"):
            for name, (target, valid) in said.items():
                student = embeddings[name]
                if name in self.projections:
                    student = F.normalize(self.projections[name](student), dim=-1)
                term = features_term(student, target, valid & batch["mask"][name])
                total = total + term
                logs[f"distill/features/{name}"] = term.detach()
        return self.settings.weight * total * world_size(), logs

    def logits_term(self, a, b, teacher_a, teacher_b, scale, name) -> torch.Tensor:
        """Both directions' soft cross-entropy over the global batch, this rank's rows' share of the mean."""
        (ta, va), (tb, vb) = teacher_a, teacher_b
        valid = va & vb
        t_scale = self.teacher_scales[name]
        tau = self.settings.temperature
        count = gather_no_grad(valid).sum().clamp(min=1)
        out = torch.zeros((), device=a.device)
        for rows, cols, t_rows, t_cols in ((a, b, ta, tb), (b, a, tb, ta)):
            all_cols, all_t_cols = gather_with_grad(cols), gather_no_grad(t_cols)
            col_valid = gather_no_grad(valid)
            student = (scale * rows @ all_cols.T / tau).masked_fill(~col_valid[None], -1e9)
            target = (t_scale * t_rows @ all_t_cols.T / tau).masked_fill(~col_valid[None], -1e9).softmax(dim=1)
            per_row = -(target * student.log_softmax(dim=1)).sum(dim=1)
            out = out + (per_row * valid).sum() / count / 2
        return out


def features_term(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the global batch's valid rows of 1 - cos(student, teacher), this rank's share."""
    count = gather_no_grad(valid).sum().clamp(min=1)
    return ((1 - (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(dim=1)) * valid).sum() / count


def teacher_dims(teacher: Teacher) -> dict[str, int]:
    if teacher.model is not None:
        return {m: teacher.model.embed_dim for m in teacher.modalities}
    return {m: table.shape[1] for m, (_, table) in teacher.features.items()}
