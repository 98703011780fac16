"""Distillation from a frozen teacher: teacher features precomputed by contrastive-embed give the same
term as the live teacher; the term is exact across ranks; a run distils through the CLI and exports
the student alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from contrastive.data.decode import BatchDecoder
from contrastive.data.shards import list_shards
from contrastive.data.sources import read_segments
from contrastive.distill import Distillation, DistillSettings, Teacher, load_teacher
from contrastive.export import export_model, load_pretrained
from contrastive.model import ContrastiveModel

from conftest import read_jsonl, run_cli, tiny_overrides
from datasets import tiny_modalities
from dist_utils import run_ranks

PAIRS = [("image", "audio"), ("image", "text"), ("audio", "text")]


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory):
    torch.manual_seed(3)
    model = ContrastiveModel(tiny_modalities(), 24)  # another size than the students' 16: projections
    return export_model(
        model,
        tmp_path_factory.mktemp("teacher") / "export",
        logit_scales={p: 14.0 for p in ("image-audio", "image-text", "audio-text")},
    )


def test_precomputed_teacher_features_give_the_live_teachers_term(demo_data, teacher_export, tmp_path):
    features = tmp_path / "features"
    run_cli(
        "contrastive-embed", "embed", str(teacher_export), "--data", str(demo_data / "heldout"), "--out", str(features)
    )
    teacher = load_pretrained(teacher_export)
    shard = list_shards(demo_data / "heldout")[0]
    slots = list(read_segments([(shard, 0, 24, None)]))
    batch = BatchDecoder(teacher.modalities, train=False)(slots)  # as contrastive-embed decodes
    torch.manual_seed(0)
    student = {m: F.normalize(torch.randn(24, 16), dim=-1).requires_grad_() for m in ("image", "audio", "text")}
    scales = {f"{a}-{b}": torch.tensor(10.0) for a, b in PAIRS}
    terms = []
    for spec in (str(teacher_export), f"features:{features}"):
        teacher = load_teacher(spec)
        torch.manual_seed(1)  # the same projections (16 -> 24) both times
        distill = Distillation(DistillSettings(teacher=spec, kind="both"), PAIRS, 16, teacher)
        term, logs = distill(student, batch, scales)
        terms.append((term.item(), {k: float(v) for k, v in logs.items()}))
    assert terms[0][0] == pytest.approx(terms[1][0], abs=1e-5)
    for key, value in terms[0][1].items():
        assert terms[1][1][key] == pytest.approx(value, abs=1e-5), key


def _term_and_grads(rows: int):
    """On each rank its slice of a fixed batch: (this rank's term, the gradient of its embeddings)."""
    import torch.distributed as dist

    r, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    g = torch.Generator().manual_seed(7)
    student = {m: F.normalize(torch.randn(rows, 8, generator=g), dim=-1) for m in ("image", "text")}
    taught = {m: F.normalize(torch.randn(rows, 8, generator=g), dim=-1) for m in ("image", "text")}
    keys = [f"k{i}" for i in range(rows)]
    mine = slice(r * rows // world, (r + 1) * rows // world)
    teacher = Teacher(
        features={m: ({k: i for i, k in enumerate(keys)}, taught[m]) for m in taught}, scales={"image-text": 20.0}
    )
    mask = torch.ones(rows, dtype=torch.bool)
    mask[3] = False  # a row without its image: no positive, no negative
    batch = {"__key__": keys[mine], "mask": {"image": mask[mine], "text": torch.ones(rows, dtype=torch.bool)[mine]}}
    local = {m: x[mine].clone().requires_grad_() for m, x in student.items()}
    distill = Distillation(DistillSettings(teacher="x", kind="both", temperature=2.0), [("image", "text")], 8, teacher)
    term, _ = distill(local, batch, {"image-text": torch.tensor(12.0)})
    term.backward()
    return float(term), torch.cat([local["image"].grad, local["text"].grad], dim=1)


def test_the_term_is_exact_across_ranks():
    ((whole, grad_whole),) = run_ranks(1, _term_and_grads, 12)
    parts = run_ranks(2, _term_and_grads, 12)
    assert sum(t for t, _ in parts) / 2 == pytest.approx(whole, abs=1e-6)  # each rank's share x world size
    # engines average the ranks' gradients: the average of the shares' is the whole batch's
    assert torch.allclose(torch.cat([g for _, g in parts]) / 2, grad_whole, atol=1e-6)


def test_a_run_distils_and_exports_the_student_alone(demo_data, teacher_export, tmp_path):
    no = run_cli(
        "contrastive-train",
        *tiny_overrides(demo_data, tmp_path / "no", f"distill.teacher={teacher_export}"),
        check=False,
    )
    assert no.returncode != 0 and "both need the same preprocessing" in no.stderr  # 32 px against the demo's
    teacher = tmp_path / "teacher"
    run_cli("contrastive-train", *tiny_overrides(demo_data, teacher, "model.embed_dim=32"))  # the demo's inputs
    run_dir = tmp_path / "run"
    run_cli(
        "contrastive-train",
        *tiny_overrides(demo_data, run_dir, f"distill.teacher={teacher / 'export'}", "distill.kind=both"),
    )
    step = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r][-1]
    assert step["distill/logits/image-text"] > 0 and step["distill/features/audio"] > 0
    state = json.loads((run_dir / "export" / "config.json").read_text())
    assert state["embed_dim"] == 64 and load_pretrained(run_dir / "export") is not None  # the student, no projection


def test_the_teachers_own_scale_whatever_the_pairs_order_and_an_unknown_one_named():
    from contrastive.errors import ConfigError

    table = ({"k": 0}, torch.zeros(1, 8))
    features = {"image": table, "text": table}
    named_the_other_way = Teacher(features=features, scales={"text-image": 97.0})
    made = Distillation(DistillSettings(teacher="x"), [("image", "text")], 8, named_the_other_way)
    assert made.teacher_scales == {"image-text": 97.0}
    silent = Teacher(features=features)
    with pytest.raises(ConfigError, match="distill.teacher_scale"):
        Distillation(DistillSettings(teacher="x"), [("image", "text")], 8, silent)
    given = Distillation(DistillSettings(teacher="x", teacher_scale=50.0), [("image", "text")], 8, silent)
    assert given.teacher_scales == {"image-text": 50.0}
    Distillation(DistillSettings(teacher="x", kind="features"), [("image", "text")], 8, silent)  # no logits: no scale
