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
ZYGOTE = Path(__file__).with_name("zygote.py")
_WARM: dict = {}  # the session's warm process (tests/zygote.py), started on first use


def _warm() -> bool:
    """Starts the session's warm process on first use; False where it is not used (a GPU machine: CUDA
    and fork do not mix; CONTRASTIVE_NO_ZYGOTE=1: every tool run a fresh process)."""
    if "proc" not in _WARM:
        import select
        import tempfile
        import time

        import torch

        _WARM["proc"] = None
        if torch.cuda.is_available() or os.environ.get("CONTRASTIVE_NO_ZYGOTE"):
            return False
        path = Path(tempfile.mkdtemp(prefix="zygote-")) / "tools.sock"
        proc = subprocess.Popen(
            [sys.executable, str(ZYGOTE), "serve", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline, line = time.monotonic() + 180, ""
        while line.strip() != "ready":  # what its imports print comes first (DeepSpeed's accelerator)
            ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            line = proc.stdout.readline() if ready else ""
            if not line:
                proc.kill()
                raise RuntimeError("tests/zygote.py did not start")
        _WARM.update(proc=proc, path=str(path))
        os.environ["CONTRASTIVE_ZYGOTE"] = str(path)
    return _WARM["proc"] is not None


def tool(name: str) -> list[str]:
    """The command that runs the console script `name` as a process of its own: forked from the
    session's warm process (tests/zygote.py: the same process, without ~6 s of imports), or the
    installed script itself."""
    return [sys.executable, str(ZYGOTE), "run", name] if _warm() else [str(BIN / name)]


def script(name: str) -> list[str]:
    """`name` as the script a launcher (torchrun, deepspeed) runs with Python, warm where it can be."""
    return [str(ZYGOTE), "run", name] if _warm() else [str(BIN / name)]


# The files that take longest (`--durations` on a 2-core machine), started first: the suite runs on
# two pytest workers a file at a time (scripts/test.sh), and a long file started last is a long tail.
LONGEST_FIRST = (
    "test_slurm.py",
    "test_packaging.py",
    "test_long_work.py",
    "test_curation.py",
    "test_readme.py",
    "test_ema.py",
    "test_deepspeed.py",
    "test_finetune.py",
    "test_resume.py",
    "test_remote.py",
    "test_checkpoints.py",
    "test_search.py",
    "test_pretrained.py",
    "test_elastic_resume.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        # two workers share two cores: a worker's own tensors use one thread, not two that spin-wait
        # for a core the other worker holds (the processes the tests start choose their own)
        torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _WARM.get("proc") is not None:
        _WARM["proc"].terminate()
        _WARM["proc"].wait(timeout=30)


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
    command = tool(name) if name.startswith("contrastive-") else [str(BIN / name)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [*command, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
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
