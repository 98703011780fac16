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
mid-upload never breaks the remote `latest` either. The upload runs in the background on rank 0
while training goes on; the next checkpoint waits for it, and the run's end awaits the last one.
`resume=latest` in an empty run directory (another node, another allocation) fetches the remote
latest first. The remote `latest` is a claim from a bucket: only a tag of the form `step_NNNNNNNN`
is followed.

Rank 0's long work (the upload, the fetch, the files it writes alone) goes through
`contrastive.distributed.run_on_main`: no collective waits on it past the process group's timeout,
and an error in it reaches every rank at once.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastive.distributed import barrier, rank, run_on_main, same_on_every_rank
from contrastive.ds_checkpoint import load_engine, save_engine

log = logging.getLogger(__name__)

LATEST = "latest"
MARKER = "contrastive.json"  # written last: its presence marks a complete checkpoint
PARTIAL = ".partial"
TAG = re.compile(r"step_\d{8}")  # what a checkpoint directory is named, and all `latest` may name


def checked_tag(tag: str, where: str) -> str:
    """`tag` if it is a checkpoint tag; a pointer naming anything else (`../..`, a path) is refused."""
    if not TAG.fullmatch(tag):
        raise ValueError(f"{where} names {tag[:80]!r}, which is no checkpoint tag (step_NNNNNNNN): not followed")
    return tag


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

    def __init__(self, url: str, keep_last: int = 0, *, timeout: float = 0.0):
        from contrastive.data.storage import check_no_secrets

        check_no_secrets(url, "trainer.checkpoint_dir")
        self.url, self.keep_last = url.rstrip("/"), keep_last
        self.timeout = timeout  # seconds an upload or a fetch may take (0: no limit)
        self._upload: threading.Thread | None = None
        self._upload_error: list[BaseException] = []

    def filesystem(self):
        from contrastive.data.storage import filesystem

        return filesystem(self.url)

    def check(self) -> None:
        """Collective: rank 0 writes and deletes a probe object, so that a wrong bucket, path or
        credential stops every rank before the first step rather than at the first checkpoint."""
        run_on_main(
            self._probe, what=f"trainer.checkpoint_dir: the write probe of {self.shown()}", timeout=self.timeout
        )

    def shown(self) -> str:
        from contrastive.data.storage import redact

        return redact(self.url)

    def _probe(self) -> None:
        from contrastive.data.storage import StorageError, redact

        fs, root = self.filesystem()
        probe = f"{root}/.write-probe-{os.getpid()}"
        try:
            fs.pipe_file(probe, b"")
            fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - whatever the store says, reported with the place
            raise StorageError(
                f"trainer.checkpoint_dir: cannot write to {redact(self.url)}: {type(e).__name__}: {e}"
            ) from None

    def start_upload(self, checkpoint: Path) -> None:
        """Rank 0: uploads `checkpoint` in the background (the previous upload has been awaited)."""
        assert self._upload is None or not self._upload.is_alive(), "the previous upload was not awaited"

        def upload() -> None:
            try:
                self.upload(checkpoint)
            except BaseException as e:  # noqa: BLE001 - raised by wait(), on every rank
                self._upload_error.append(e)

        self._upload = threading.Thread(target=upload, name=f"upload {checkpoint.name}", daemon=True)
        self._upload.start()

    def wait(self) -> None:
        """Rank 0: until the background upload (if any) has finished; raises its error."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error:
            raise self._upload_error.pop()

    def await_upload(self, what: str = "the upload of the last checkpoint") -> None:
        """Collective: every rank waits (heartbeating) until rank 0's background upload has finished."""
        run_on_main(self.wait, what=f"{what} to {self.shown()}", timeout=self.timeout)

    def upload(self, checkpoint: Path) -> None:
        """Every file of a complete checkpoint, its marker last, then `latest`; older tags pruned."""
        from contrastive.data.storage import redact

        fs, root = self.filesystem()
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
        fs, root = self.filesystem()
        if not fs.exists(f"{root}/{LATEST}"):
            return None
        tag = fs.cat_file(f"{root}/{LATEST}").decode(errors="replace").strip()
        return checked_tag(tag, f"{self.shown()}/{LATEST}") if tag else None

    def fetch(self, tag: str, run_dir: str | os.PathLike) -> Path:
        """Downloads `<url>/<tag>` into the run's checkpoints (through .partial, renamed when complete)."""
        from contrastive.data.storage import redact

        fs, root = self.filesystem()
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
    files: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. `meta` (JSON) is rank 0's record of the run's state;
    `rank_state` is this rank's own (RNG states); `files`: name -> a function rank 0 calls with the
    path to write that file of the checkpoint (the weights' average). With `remote`, the previous
    checkpoint's upload is awaited first and this one's starts in the background on rank 0."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step:08d}"
    partial = root / PARTIAL
    if remote is not None:
        remote.await_upload("the upload of the previous checkpoint")

    def prepare() -> None:
        shutil.rmtree(partial / tag, ignore_errors=True)
        (partial / tag).mkdir(parents=True)

    run_on_main(prepare, what=f"preparing checkpoint {tag}")
    save_engine(engine, partial, tag, client_state={})
    torch.save(rank_state, partial / tag / f"rank{rank():05d}.pt")
    barrier()
    final = root / tag

    def complete() -> None:
        for name, write in (files or {}).items():
            write(partial / tag / name)
        (partial / tag / MARKER).write_text(json.dumps({"step": step, **meta}, indent=1, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial / tag, final)
        _write_atomic(root / LATEST, tag + "\n")
        if keep_last > 0:
            done = sorted(p for p in root.iterdir() if p.is_dir() and TAG.fullmatch(p.name))
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        if remote is not None:
            remote.start_upload(final)

    run_on_main(complete, what=f"completing checkpoint {tag}")
    return final


def is_complete(path: Path) -> bool:
    return (path / MARKER).exists()


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / checked_tag(pointer.read_text().strip(), str(pointer))
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
            # rank 0 reads the remote pointer (every rank follows the same one; a failure there ends
            # every rank at once, named) and fetches
            read = run_on_main(remote.latest_tag, what=f"reading {remote.shown()}/latest", timeout=remote.timeout)
            tag = same_on_every_rank(read)
            if tag is not None:
                run_on_main(
                    lambda: remote.fetch(tag, run_dir),
                    what=f"fetching checkpoint {tag} from {remote.shown()}",
                    timeout=remote.timeout,
                )
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
    """Collective: adds the evaluation at a checkpoint's step to its record (rank 0; atomic, so the
    checkpoint stays complete whatever happens): exports made from it carry these figures. With
    `remote`, the checkpoint's upload is awaited and its record uploaded again."""
    marker = Path(path) / MARKER

    def record() -> None:
        _write_atomic(marker, json.dumps({**read_meta(path), "metrics": dict(metrics)}, indent=1, default=str) + "\n")
        if remote is not None:
            remote.wait()
            fs, root = remote.filesystem()
            fs.put_file(str(marker), f"{root}/{Path(path).name}/{MARKER}")

    what = f"recording the final metrics in {Path(path).name}" + (" and finishing its upload" if remote else "")
    run_on_main(record, what=what, timeout=remote.timeout if remote is not None else 0)


def load_checkpoint(path: Path, engine: Any, *, timeout: float = 0.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores the engine (weights, optimizer, schedule) from `path`, saved by this number of ranks or
    another; returns (meta, this rank's state: empty for a rank the saving run did not have)."""
    meta = read_meta(path)
    saved_world_size = meta.get("data_layout", {}).get("world_size")
    load_engine(engine, path.parent, path.name, saved_world_size=saved_world_size, timeout=timeout)
    mine = path / f"rank{rank():05d}.pt"
    # RNG states: numpy's is a tuple holding an ndarray, which weights_only refuses; the file is ours
    rank_state = torch.load(mine, map_location="cpu", weights_only=False) if mine.exists() else {}
    return meta, rank_state
