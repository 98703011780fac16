"""Training checkpoints: DeepSpeed's files (weights, optimizer and ZeRO partitions, schedule) plus our
own state, written atomically, with a `latest` pointer that never names a broken checkpoint, and
the last K kept.

    <run>/checkpoints/
      step_00000400/            DeepSpeed's files, rank<r>.pt (each rank's RNG state), contrastive.json
      step_00000800/
      latest                    "step_00000800"

Every rank writes into `<run>/checkpoints/.partial/<tag>` first. Once all have finished, rank 0
writes `contrastive.json` (the step, the loader position, the config) and renames the directory into
place, then replaces `latest`. A crash at any point leaves `latest` naming a complete checkpoint.

Off the node (`trainer.checkpoint_dir=s3://bucket/run`, any fsspec URL): each complete checkpoint is
then uploaded, `contrastive.json` last, and the remote `latest` is moved after it, so a crash
mid-upload never breaks the remote `latest` either. `resume=latest` in an empty run directory (another
node, another allocation) fetches the remote latest first.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastive.distributed import barrier, rank

log = logging.getLogger(__name__)

LATEST = "latest"
MARKER = "contrastive.json"  # written last: its presence marks a complete checkpoint
PARTIAL = ".partial"


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


class RemoteCheckpoints:
    """Checkpoints mirrored to a URL: `<url>/<tag>/...` and `<url>/latest`."""

    def __init__(self, url: str, keep_last: int = 0):
        from contrastive.data.storage import check_no_secrets

        check_no_secrets(url, "trainer.checkpoint_dir")
        self.url, self.keep_last = url.rstrip("/"), keep_last

    def _fs(self):
        from contrastive.data.storage import filesystem

        return filesystem(self.url)

    def check(self) -> None:
        """Writes and deletes a probe object (rank 0), so that a wrong bucket, path or credential stops
        the run before its first step rather than at its first checkpoint."""
        from contrastive.data.storage import StorageError, redact

        if rank() != 0:
            return
        fs, root = self._fs()
        probe = f"{root}/.write-probe-{os.getpid()}"
        try:
            fs.pipe_file(probe, b"")
            fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - whatever the store says, reported with the place
            raise StorageError(
                f"trainer.checkpoint_dir: cannot write to {redact(self.url)}: {type(e).__name__}: {e}"
            ) from None

    def upload(self, checkpoint: Path) -> None:
        """Every file of a complete checkpoint, its marker last, then `latest`; older tags pruned."""
        from contrastive.data.storage import redact

        fs, root = self._fs()
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MARKER)
        for path in [*files, checkpoint / MARKER]:
            fs.put_file(str(path), f"{root}/{checkpoint.name}/{path.relative_to(checkpoint)}")
        fs.pipe_file(f"{root}/{LATEST}", (checkpoint.name + "\n").encode())
        log.info("checkpoint %s uploaded to %s", checkpoint.name, redact(self.url))
        if self.keep_last > 0:
            tags = sorted(
                p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("step_")
            )
            for old in tags[: -self.keep_last]:
                fs.rm(f"{root}/{old}", recursive=True)

    def latest_tag(self) -> str | None:
        fs, root = self._fs()
        if not fs.exists(f"{root}/{LATEST}"):
            return None
        return fs.cat_file(f"{root}/{LATEST}").decode().strip() or None

    def fetch(self, tag: str, run_dir: str | os.PathLike) -> Path:
        """Downloads `<url>/<tag>` into the run's checkpoints (through .partial, renamed when complete)."""
        from contrastive.data.storage import redact

        fs, root = self._fs()
        local = checkpoint_root(run_dir)
        staging = local / PARTIAL / tag
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for remote in fs.find(f"{root}/{tag}"):
            target = staging / remote[len(f"{root}/{tag}/") :]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        if not is_complete(staging):
            raise FileNotFoundError(f"{redact(self.url)}/{tag} is incomplete (no {MARKER})")
        os.replace(staging, local / tag)
        _write_atomic(local / LATEST, tag + "\n")
        log.info("fetched checkpoint %s from %s", tag, redact(self.url))
        return local / tag


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    engine: Any,
    *,
    meta: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int = 2,
    remote: RemoteCheckpoints | None = None,
) -> Path:
    """Collective: every rank calls it. `meta` (JSON) is rank 0's record of the run's state;
    `rank_state` is this rank's own (RNG states)."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step:08d}"
    partial = root / PARTIAL
    if rank() == 0:
        shutil.rmtree(partial / tag, ignore_errors=True)
        (partial / tag).mkdir(parents=True)
    barrier()
    engine.save(partial, tag, client_state={})
    torch.save(rank_state, partial / tag / f"rank{rank():05d}.pt")
    barrier()
    final = root / tag
    if rank() == 0:
        (partial / tag / MARKER).write_text(json.dumps({"step": step, **meta}, indent=1, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial / tag, final)
        _write_atomic(root / LATEST, tag + "\n")
        if keep_last > 0:
            done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        if remote is not None:
            remote.upload(final)
    barrier()
    return final


def is_complete(path: Path) -> bool:
    return (path / MARKER).exists()


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    return path if is_complete(path) else None


def resolve_resume(
    resume: str | None, run_dir: str | os.PathLike, remote: RemoteCheckpoints | None = None
) -> Path | None:
    """`latest` -> this run directory's latest checkpoint (None when there is none yet, so the same
    command starts or resumes a run), or with `remote` and none here, the remote latest, fetched by
    rank 0 into the (shared) run directory; a path -> that checkpoint (or that run's latest)."""
    if not resume:
        return None
    if resume == LATEST:
        found = latest_checkpoint(run_dir)
        if found is None and remote is not None:
            tag = remote.latest_tag()
            if tag is not None and rank() == 0:
                remote.fetch(tag, run_dir)
            barrier()
            found = latest_checkpoint(run_dir)
        if found is None:
            log.info("resume=latest: no checkpoint in %s yet, starting from scratch", checkpoint_root(run_dir))
        return found
    path = Path(resume)
    if is_complete(path):
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"resume={resume!r}: no complete checkpoint there (a checkpoint directory holds {MARKER},"
        " a run directory a checkpoints/latest pointer)"
    )


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def record_metrics(path: str | os.PathLike, metrics: dict[str, float], remote: RemoteCheckpoints | None = None) -> None:
    """Adds the evaluation at a checkpoint's step to its record (rank 0; atomic, so the checkpoint
    stays complete whatever happens): exports made from it carry these figures."""
    if rank() == 0:
        marker = Path(path) / MARKER
        _write_atomic(marker, json.dumps({**read_meta(path), "metrics": dict(metrics)}, indent=1, default=str) + "\n")
        if remote is not None:
            fs, root = remote._fs()
            fs.put_file(str(marker), f"{root}/{Path(path).name}/{MARKER}")
    barrier()


def load_checkpoint(path: Path, engine: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores the engine (weights, optimizer, schedule) from `path`, saved by this number of ranks or
    another; returns (meta, this rank's state: empty for a rank the saving run did not have)."""
    meta = read_meta(path)
    engine.load(path.parent, path.name, saved_world_size=meta.get("data_layout", {}).get("world_size"))
    mine = path / f"rank{rank():05d}.pt"
    rank_state = torch.load(mine, map_location="cpu", weights_only=False) if mine.exists() else {}
    return meta, rank_state
