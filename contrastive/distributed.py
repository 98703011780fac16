"""Everything distributed lives here: process-group setup from any launcher, the differentiable
all-gather, long work on rank 0 that no collective times out on, and small helpers. The rest of the
code asks `is_main()`, calls `gather_with_grad`, and hands rank 0's long work to `run_on_main`.

Rank and world size come from whichever launcher set the environment (`LAUNCHERS`): torchrun
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), the DeepSpeed launcher (the same, but LOCAL_SIZE
for the ranks on a node), SLURM's srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
SLURM_TASKS_PER_NODE) or OpenMPI's mpirun (OMPI_COMM_WORLD_*). The backend is NCCL on CUDA and gloo
on CPU; every collective gives up after `trainer.dist_timeout` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("contrastive")
T = TypeVar("T")
DEFAULT_TIMEOUT = 1800  # seconds a collective waits (trainer.dist_timeout)


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


def launcher_env(env: dict | None = None) -> tuple[int, int, int, int]:
    """(rank, local rank, world size, ranks on this node) from torchrun's, DeepSpeed's, SLURM's or
    OpenMPI's variables (in that order of precedence); (0, 0, 1, 1) alone."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        # torchrun: LOCAL_WORLD_SIZE; the DeepSpeed launcher: LOCAL_SIZE; neither (a hand-made
        # environment): the node's count from SLURM if it ran under srun, else every rank on one node
        local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
        if local is None and "SLURM_TASKS_PER_NODE" in env:
            local = slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], int(env.get("SLURM_NODEID", 0)))
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world, int(local or world)
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        return (
            int(env["OMPI_COMM_WORLD_RANK"]),
            int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            world,
            int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)),
        )
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


def init_distributed(device: str = "auto", *, timeout: float = DEFAULT_TIMEOUT) -> DistInfo:
    """Joins the process group the launcher prepared (if any) and picks this rank's device; every
    collective gives up after `timeout` seconds (rank 0's long work goes through `run_on_main`)."""
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
            backend="nccl" if dev.type == "cuda" else "gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=timeout),
        )
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=dev if dev.type == "cuda" else None,
            timeout=timedelta(seconds=timeout),
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


class RankZeroError(RuntimeError):
    """Long work on rank 0 failed (or ran out of time): raised on every rank at once."""


def run_on_main(work: Callable[[], T], *, what: str, timeout: float = 0.0, poll: float = 1.0) -> T | None:
    """Collective: rank 0 does `work` (an upload, a download, a conversion, an export) while every
    rank waits in a heartbeat of short broadcasts, one each `poll` seconds, instead of one collective
    that the process group's timeout would end. Returns what `work` returned on rank 0 (None on the
    others). If `work` raises on rank 0, or has not finished after `timeout` seconds (0: no limit),
    every rank raises RankZeroError at once, naming `what` and the error, and logs it."""
    if world_size() == 1:
        return _bounded(work, what, timeout)
    result: list = []
    failure: list[str] = []
    thread = None
    if rank() == 0:

        def target() -> None:
            try:
                result.append(work())
            except BaseException as e:  # noqa: BLE001 - reported to every rank
                failure.append(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")

        thread = threading.Thread(target=target, name=f"rank0: {what}", daemon=True)
        thread.start()
    started = time.monotonic()
    while True:
        state = [None]
        if thread is not None:
            thread.join(poll)
            if thread.is_alive() and timeout and time.monotonic() - started > timeout:
                failure.append(f"it did not finish within {timeout:.0f} s")
            state = ["running" if thread.is_alive() and not failure else failure[0] if failure else "done"]
        dist.broadcast_object_list(state, src=0)
        if state[0] == "done":
            return result[0] if result else None
        if state[0] != "running":
            log.error("%s failed on rank 0: %s", what, state[0])
            raise RankZeroError(f"{what} failed on rank 0: {state[0].splitlines()[0]}")


def _bounded(work: Callable[[], T], what: str, timeout: float) -> T:
    if not timeout:
        return work()
    result: list = []
    failure: list[BaseException] = []
    thread = threading.Thread(target=lambda: _collect(work, result, failure), name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RankZeroError(f"{what} did not finish within {timeout:.0f} s")
    if failure:
        raise failure[0]
    return result[0]


def _collect(work: Callable[[], T], result: list, failure: list) -> None:
    try:
        result.append(work())
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller
        failure.append(e)


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
