"""Everything distributed lives here: process-group setup from any launcher, the differentiable
all-gather, and small helpers. The rest of the code asks `is_main()` and calls `gather_with_grad`.

Rank and world size come from whichever launcher set the environment: torchrun and the DeepSpeed
launcher (RANK, LOCAL_RANK, WORLD_SIZE) or SLURM's srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS).
The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """The task count of node `node_id` from SLURM_TASKS_PER_NODE ("8(x2)", "2,1", "4(x3),2")."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} is not in SLURM's format")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def launcher_env() -> tuple[int, int, int, int]:
    """(rank, local rank, world size, ranks on this node) from torchrun/DeepSpeed or SLURM variables;
    (0, 0, 1, 1) alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world, int(env.get("LOCAL_WORLD_SIZE", world))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        world = int(env["SLURM_NTASKS"])
        local = world
        if "SLURM_TASKS_PER_NODE" in env:
            local = slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], int(env.get("SLURM_NODEID", 0)))
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, local
    return 0, 0, 1, 1


def choose_device(
    requested: str, *, local_rank: int, local_world_size: int, visible_gpus: int, visible_env: str | None
) -> torch.device:
    """This rank's device from what the process sees: `requested` is auto | cpu | cuda; `visible_gpus`
    the GPUs this process can see (torch.cuda.device_count()), `visible_env` CUDA_VISIBLE_DEVICES.

    One visible GPU: that one (SLURM's --gpus-per-task=1 shows each task only its own, numbered 0).
    Several: the local rank's. Fewer than the ranks on the node, but more than one: an error naming
    CUDA_VISIBLE_DEVICES, the local rank and the count, since ranks would collide on a GPU."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device: expected auto, cpu or cuda, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and visible_gpus == 0):
        return torch.device("cpu")
    shown = f"CUDA_VISIBLE_DEVICES={visible_env!r}" if visible_env is not None else "CUDA_VISIBLE_DEVICES unset"
    if visible_gpus == 0:
        raise RuntimeError(f"trainer.device=cuda, but this process sees no GPU ({shown})")
    if visible_gpus == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible_gpus or visible_gpus < local_world_size:
        raise RuntimeError(
            f"local rank {local_rank} of {local_world_size} on this node sees {visible_gpus} GPUs ({shown}): "
            f"fewer GPUs than ranks, so ranks would share one. Start one rank per GPU, or give each task its "
            f"own GPU (launcher.gpus_per_task=1)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Joins the process group the launcher prepared (if any) and picks this rank's device."""
    rank, local_rank, world_size, local_world_size = launcher_env()
    visible = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    dev = choose_device(
        device,
        local_rank=local_rank,
        local_world_size=local_world_size,
        visible_gpus=visible,
        visible_env=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Whatever started us, the variables torchrun would set (DeepSpeed reads them too).
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world_size))
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
    return DistInfo(
        rank=rank, local_rank=local_rank, world_size=world_size, device=dev, local_world_size=local_world_size
    )


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
