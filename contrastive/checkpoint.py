"""Training checkpoints: atomic directories, a `latest` pointer that never names a broken one, and
the last K kept.

A checkpoint is `<run>/checkpoints/step_XXXXXXXX/state.pt`, holding weights, optimizer, schedule,
step, the data position, bad-input counters and every RNG state. It is written under a temporary
name and renamed into place only once complete; `latest` (a one-line file) is replaced atomically
after that, so a crash at any moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

LATEST = "latest"
STATE = "state.pt"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], *, keep_last: int = 2) -> Path:
    """Writes `state` as the checkpoint of `step`, points `latest` at it and prunes old ones."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, name + "\n")
    if keep_last > 0:
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if (path / STATE).exists() else None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """`latest` -> this run directory's latest checkpoint (None when there is none yet, so the same
    command starts or resumes a run); a path -> that checkpoint, which must exist."""
    if not resume:
        return None
    if resume == LATEST:
        found = latest_checkpoint(run_dir)
        if found is None:
            log.info("resume=latest: no checkpoint in %s yet, starting from scratch", checkpoint_root(run_dir))
        return found
    path = Path(resume)
    if (path / STATE).exists():
        return path
    found = latest_checkpoint(path) or latest_checkpoint(path.parent)
    if path.is_dir() and found is not None:
        return found
    raise FileNotFoundError(f"resume={resume!r}: no checkpoint there (expected a directory holding {STATE})")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)
