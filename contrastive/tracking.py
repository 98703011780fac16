"""Where metrics go: `metrics.jsonl` in the run directory always; wandb (offline unless configured
online) and TensorBoard when enabled. Only the main rank writes."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("contrastive")


@dataclass
class LoggerConfig:
    """`logger.*`: metrics.jsonl always; wandb and TensorBoard on demand."""

    wandb: str = "disabled"  # disabled | offline | online
    project: str = "contrastive"
    tensorboard: bool = False


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        wandb_mode: str = "disabled",
        project: str = "contrastive",
        tensorboard: bool = False,
        config: Mapping[str, Any] | None = None,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        continue_log(self.path, start_step)
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=project, mode=wandb_mode, dir=str(run_dir), config=dict(config or {}))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def continue_log(path: Path, start_step: int) -> None:
    """Readies a log of step rows for a run starting at `start_step`. Resuming, the rows past it (written
    after the checkpoint, and about to be written again) are dropped, so each step has one row; a new
    run in a directory that holds an earlier run's log moves that log aside (`metrics.1.jsonl`, ...)
    instead of mixing the two runs in one file."""
    if not path.exists() or path.stat().st_size == 0:
        return
    if start_step == 0:
        n = 1
        while path.with_suffix(f".{n}.jsonl").exists():
            n += 1
        path.rename(path.with_suffix(f".{n}.jsonl"))
        log.warning("%s held an earlier run's rows: moved to %s", path, path.with_suffix(f".{n}.jsonl").name)
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= start_step]
    if len(kept) < len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        log.info("%s: %d rows past step %d dropped (they are written again)", path, len(lines) - len(kept), start_step)


class KeyRecorder:
    """Appends each step's sample keys to <run>/keys/rank<r>.jsonl (an audit of what trained when)."""

    def __init__(self, run_dir: Path, rank: int, start_step: int = 0):
        self.path = run_dir / "keys" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        continue_log(self.path, start_step)

    def __call__(self, step: int, keys: list[str]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")
