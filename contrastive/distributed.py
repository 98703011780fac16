"""Everything distributed lives here: process-group setup from any launcher, the differentiable
all-gather, and small helpers. The rest of the code asks `is_main()` and calls `gather_with_grad`.

Rank and world size come from whichever launcher set the environment: torchrun and the DeepSpeed
launcher (RANK, LOCAL_RANK, WORLD_SIZE) or SLURM's srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS).
The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun/DeepSpeed or SLURM variables; (0, 0, 1) alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Joins the process group the launcher prepared (if any) and picks this rank's device."""
    rank, local_rank, world_size = launcher_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Whatever started us, the variables torchrun would set (DeepSpeed reads them too).
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    if world_size == 1 and not dist.is_initialized():
        # A group of one, so that the training engine (DeepSpeed) runs the same code path alone.
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def same_on_every_rank(value):
    """Rank 0's `value` on every rank (e.g. a run directory named after the time each rank started)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sends each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        # Every rank's loss depends on every slice: sum the gradients of all ranks, keep our slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world * n, ...] in rank order; gradients flow back to the owner rank.

    Every rank must pass the same shape (batches here always have the same number of rows, with
    masks for missing or padded samples)."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without autograd (masks, labels, evaluation features)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
