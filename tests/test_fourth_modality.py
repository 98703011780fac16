"""A modality is one file: this test file alone defines and registers a fourth modality (a feature
vector stored as `.vec` bytes) and trains it against text through the real CLI, with no edit under
contrastive/. The CLI finds it through `imports=[test_fourth_modality]`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from contrastive.modalities import Modality, register_modality

from conftest import REPO, read_jsonl, run_cli

COLOURS = ["red", "green", "blue", "yellow"]


@register_modality("vec")
@dataclass
class Vector(Modality):
    extensions = ("vec",)
    dim: int = 8
    hidden: int = 32

    def decode(self, data: bytes, extension: str) -> np.ndarray:
        value = np.frombuffer(data, dtype=np.float32)
        if value.size != self.dim:
            raise ValueError(f"expected {self.dim} floats, got {value.size}")
        return value

    def preprocess(self, value: np.ndarray, *, train: bool) -> torch.Tensor:
        return torch.from_numpy(value.copy())

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.dim)

    def build_encoder(self, embed_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, embed_dim))


def vec_samples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = int(rng.integers(len(COLOURS)))
        v = np.zeros(8, dtype=np.float32)
        v[c] = 2.0
        v += rng.normal(0, 0.3, 8).astype(np.float32)
        out.append(
            {
                "__key__": f"v{seed}-{i:04d}",
                "vec": v.tobytes(),
                "txt": f"something {COLOURS[c]}",
                "json": {"label": COLOURS[c]},
            }
        )
    return out


def test_a_fourth_modality_trains_through_the_cli(tmp_path):
    import contrastive

    from datasets import write_dataset

    write_dataset(tmp_path / "train", vec_samples(96, 0), shard_size=32)
    write_dataset(tmp_path / "eval", vec_samples(40, 1), shard_size=40)
    run_dir = tmp_path / "run"
    run_cli(
        "contrastive-train",
        "experiment=demo",
        "debug=smoke",
        "modalities=[vec,text]",
        "imports=[test_fourth_modality]",
        f"data.train={tmp_path / 'train'}",
        f"data.eval={tmp_path / 'eval'}",
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=60",
        "trainer.log_every=10",
        "data.batch_size=16",
        "trainer.threads=1",
        "optim.scheduler.warmup_steps=5",
        "eval.prompts=['something {label}']",
        env={"PYTHONPATH": str(REPO / "tests")},
    )
    rows = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    # An untrained model scores about log(16) = 2.77 on a batch of 16; with four classes a batch, the
    # best a model can do is about log(4) = 1.39 (captions tie within a class).
    assert max(losses[-3:]) < 1.65, losses
    final = rows[-1]
    assert final["eval/zero_shot/vec->text/acc"] > 0.6  # chance is 0.25
    # the export loads back with the registered class, and embeds raw vectors
    model = contrastive.load_pretrained(run_dir / "export")
    assert isinstance(model.modalities["vec"], Vector)
    emb = model.embed("vec", [np.eye(8, dtype=np.float32)[0] * 2])
    assert emb.shape == (1, 64)
