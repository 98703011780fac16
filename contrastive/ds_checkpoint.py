"""DeepSpeed's checkpoint files: an engine's state saved and loaded (`save_engine`, `load_engine`: on
another number of ranks through DeepSpeed's universal checkpoint), what a resume is checked by
(`optimizer_moments`), and, outside an engine, the whole fp32 state dict of a checkpoint of any ZeRO
stage (for exports)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from contrastive.distributed import all_reduce_sum, barrier, rank, run_on_main, world_size

log = logging.getLogger("contrastive")


def save_engine(engine: Any, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Collective: the engine's weights, optimizer states (partitions under ZeRO) and schedule in
    `directory/tag`, with what ds_to_universal needs to re-partition them for another number of ranks."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.engine.save_checkpoint(str(directory), tag=tag, client_state={**info, **client_state}, save_latest=False)


def needs_universal(checkpoint: Path | None, saved_world_size: int | None) -> bool:
    """Whether resuming `checkpoint` here goes through a universal checkpoint: partitioned optimizer
    states (ZeRO 1-3, bf16) saved by another number of ranks. The engine must then be built with
    DeepSpeed's `checkpoint.load_universal` (contrastive.engine.deepspeed_config(load_universal=True))."""
    if checkpoint is None or saved_world_size in (None, world_size()):
        return False
    return any(Path(checkpoint).glob("*zero_pp_rank_*optim_states.pt"))


def load_engine(
    engine: Any, directory: Path, tag: str, *, saved_world_size: int | None = None, timeout: float = 0.0
) -> dict[str, Any]:
    """Collective: weights, optimizer states and schedule from checkpoint `directory/tag`. One saved by
    another number of ranks with partitioned optimizer states goes through DeepSpeed's universal
    checkpoint: rank 0 converts it (ds_to_universal: every parameter's fp32 weights and optimizer
    moments, whole; within `timeout` seconds, while the others heartbeat) and every rank loads its
    new partition from that."""
    checkpoint = Path(directory) / tag
    universal = needs_universal(checkpoint, saved_world_size)
    if universal != engine.engine.load_universal_checkpoint():
        raise RuntimeError(
            f"{checkpoint} {'needs' if universal else 'is no'} universal checkpoint here: build the engine "
            f"with deepspeed_config(load_universal={universal})"
        )
    if universal:
        converted = checkpoint.parent / ".universal" / checkpoint.name
        run_on_main(
            lambda: to_universal(checkpoint, converted, timeout=timeout),
            what=f"converting {checkpoint.name} to a universal checkpoint",
        )
        directory, tag = converted.parent, converted.name
    path, client_state = engine.engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if universal:
        barrier()
        if rank() == 0:
            shutil.rmtree(converted, ignore_errors=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag} in {directory}")
    return client_state or {}


def optimizer_moments(engine: Any) -> dict[str, float]:
    """The L2 norms of the optimizer's moments over every trained parameter and its step count,
    whatever the partitioning (collective under ZeRO): what a resume can be checked by."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer
    squares = torch.zeros(2, dtype=torch.float64)
    steps = []
    for state in inner.state.values():  # ZeRO: this rank's flat partitions; else every parameter
        for i, key in enumerate(("exp_avg", "exp_avg_sq")):
            if key in state:
                squares[i] += state[key].double().square().sum().cpu()
        if "step" in state:
            steps.append(float(state["step"]))
    if engine.zero_stage >= 1:
        squares = all_reduce_sum(squares)  # the partitions are disjoint
    return {"exp_avg": math.sqrt(squares[0]), "exp_avg_sq": math.sqrt(squares[1]), "step": max(steps, default=0.0)}


def to_universal(checkpoint: Path, universal: Path, *, timeout: float = 0.0) -> None:
    """DeepSpeed's ds_to_universal (one process): every parameter's fp32 weights and optimizer moments,
    whole, in `universal`, from which any number of ranks loads its partition. Stopped after
    `timeout` seconds (0: no limit)."""
    shutil.rmtree(universal, ignore_errors=True)
    universal.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint)]
    command += ["--output_folder", str(universal), "--inject_missing_state"]
    command += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout or None)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"ds_to_universal did not convert {checkpoint} within {timeout:.0f} s (trainer.transfer_timeout)"
        ) from None
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal could not convert {checkpoint}:\n{done.stderr[-4000:]}")
    log.info("converted %s to a universal checkpoint for this number of ranks", checkpoint.name)


def consolidated_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The objective's full fp32 state dict from a checkpoint directory written by `Engine.save`,
    whatever its ZeRO stage (stages 1-3: gathered from the partitions by DeepSpeed's zero_to_fp32)."""
    ckpt = Path(checkpoint_dir)
    # ZeRO-3 names its model states per partition; rank 0's holds the config and the module skeleton.
    states = next(
        p
        for p in (ckpt / "mp_rank_00_model_states.pt", ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        if p.exists()
    )
    # DeepSpeed's own file (its config, the module's layout): our run wrote it, as DeepSpeed reads it
    model_states = torch.load(states, map_location="cpu", weights_only=False)
    stage = (model_states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage >= 1 and any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        state = model_states["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
