"""Shared fixtures: a small demo data set, Hydra composition, and running the real CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contrastive.config import CONFIG_DIR as _CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(_CONFIG_DIR)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo set, cut down: 160 training images (160 samples), 40 held-out, 40 samples a shard."""
    from contrastive.data_tools.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out, copies=1, max_images=160, shard_size=40)
    return out


def compose(*overrides: str):
    """`configs/train.yaml` composed with `overrides`, exactly as contrastive-train composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from contrastive.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def run_cli(
    name: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs an installed console script (contrastive-train, ...) as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [str(BIN / name), *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_overrides(demo: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny demo experiment on the small demo set, a few steps, in `run_dir`."""
    return [
        "experiment=demo",
        "debug=smoke",
        f"data.train={demo / 'train'}",
        f"data.eval={demo / 'heldout'}",
        f"hydra.run.dir={run_dir}",
        "trainer.threads=1",
        *extra,
    ]
