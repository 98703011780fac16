"""DeepSpeed's checkpoint files read or rewritten outside an engine: the whole fp32 state dict of a
checkpoint of any ZeRO stage (for exports), and the universal checkpoint that lets a run saved on N
ranks resume on M (`Engine.load`)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

log = logging.getLogger("contrastive")


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
