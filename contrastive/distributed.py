"""Everything distributed lives here: process-group setup from any launcher, the differentiable
all-gather, long work on rank 0 that no collective times out on, and small helpers. The rest of the
code asks `is_main()`, calls `gather_with_grad`, and hands rank 0's long work to `run_on_main`.
Nothing else calls a `torch.distributed` collective (tests/test_house.py checks it).

Rank and world size come from whichever launcher set the environment (`LAUNCHERS`): torchrun
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), the DeepSpeed launcher (the same, but LOCAL_SIZE
for the ranks on a node), SLURM's srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
SLURM_TASKS_PER_NODE) or OpenMPI's mpirun (OMPI_COMM_WORLD_*). Every collective gives up after
`trainer.dist_timeout` seconds.

Which device a collective's tensor may sit on. NCCL serves CUDA tensors only: a flag made with
`torch.tensor(...)` on the host and all-reduced on a GPU run fails with "No backend type associated
with device type cpu", and gloo tests on CPU cannot see it. Two rules make that class of defect
impossible, each enough alone:

1. **The group serves both devices.** A CUDA run's process group is `"cpu:gloo,cuda:nccl"`
   (`backend_spec`): torch routes a host tensor to gloo and a device tensor to NCCL, so no
   collective anywhere (ours, DeepSpeed's, a later change's) can meet a device the group lacks.
   Object collectives (`all_gather_object`, `broadcast_object_list`) then stay on the host too,
   instead of copying every pickle to the GPU and back. This is the rule by construction.
2. **Every helper here puts its tensor where the group serves it** (`_placed`): the run's device
   when the group does not serve the tensor's own, the result moved back. This keeps a group that
   refuses host tensors (`trainer.dist_backend=nccl`, or `cuda:gloo`, which the one-GPU check uses
   to stand in for NCCL across two ranks) working, and keeps the per-step flags on the device,
   where their collective costs no host round trip.

Collectives at world size 1 are skipped, unless `trainer.force_collectives` asks for them (a one-GPU
machine can then run every collective for real under NCCL).
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
from typing import Any, Callable, TypeVar

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


def backend_spec(device_type: str, requested: str = "auto") -> str:
    """The process group's backend for a run on `device_type` (`trainer.dist_backend`): on CPU gloo;
    on CUDA `cpu:gloo,cuda:nccl`, so that the group serves host and device tensors alike (rule 1 of
    the module docstring); anything else as requested (`nccl`, `cuda:gloo`, `gloo`, ...)."""
    if requested != "auto":
        return requested
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


@dataclass
class _Collectives:
    device: torch.device = torch.device("cpu")  # this rank's device: where a tensor goes that the group cannot serve
    forced: bool = False  # trainer.force_collectives: run them at world size 1 too


_COLLECTIVES = _Collectives()


def init_distributed(
    device: str = "auto", *, timeout: float = DEFAULT_TIMEOUT, backend: str = "auto", force_collectives: bool = False
) -> DistInfo:
    """Joins the process group the launcher prepared (if any) and picks this rank's device; every
    collective gives up after `timeout` seconds (rank 0's long work goes through `run_on_main`).
    `backend`: the group's backend (`backend_spec`); `force_collectives`: collectives run even alone."""
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
    spec = backend_spec(dev.type, backend)
    _COLLECTIVES.device, _COLLECTIVES.forced = dev, force_collectives
    if world_size == 1 and not dist.is_initialized():
        # A group of one, so that the training engine (DeepSpeed) runs the same code path alone.
        dist.init_process_group(
            backend=spec,
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=timeout),
        )
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=spec,
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


def collectives_on() -> bool:
    """Whether collectives run: more than one rank, or `trainer.force_collectives` with a group of one."""
    return dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1 or _COLLECTIVES.forced)


def served_devices() -> set[str]:
    """The device types the default group's collectives serve (`cpu:gloo,cuda:nccl` -> {cpu, cuda})."""
    return {part.split(":")[0] for part in dist.get_backend_config().split(",")}


def _placed(tensor: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(`tensor` on a device the group serves, a function that puts a result back where `tensor`
    was): rule 2 of the module docstring."""
    if tensor.device.type in served_devices():
        return tensor, lambda result: result
    here = tensor.device
    return tensor.to(_COLLECTIVES.device), lambda result: result.to(here)


def barrier() -> None:
    if collectives_on():
        dist.barrier()


def same_on_every_rank(value):
    """Rank 0's `value` on every rank (e.g. a run directory named after the time each rank started)."""
    if not collectives_on():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order."""
    if not collectives_on():
        return [value]
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


class RankZeroError(RuntimeError):
    """Long work on rank 0 failed (or ran out of time): raised on every rank at once."""


def run_on_main(work: Callable[[], T], *, what: str, timeout: float = 0.0, poll: float = 1.0) -> T | None:
    """Collective: rank 0 does `work` (an upload, a download, a conversion, an export) while every
    rank waits in a heartbeat of short broadcasts, one each `poll` seconds, instead of one collective
    that the process group's timeout would end. Returns what `work` returned on rank 0 (None on the
    others). If `work` raises on rank 0, or has not finished after `timeout` seconds (0: no limit),
    every rank raises RankZeroError at once, naming `what` and the error, and logs it."""
    if not collectives_on():
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
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every slice: sum the gradients of all ranks, keep our slice.
        grad = all_reduce_sum(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    tensor, back = _placed(tensor.contiguous())
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return back(torch.cat(parts, dim=0))


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world * n, ...] in rank order; gradients flow back to the owner rank.

    Every rank must pass the same shape (batches here always have the same number of rows, with
    masks for missing or padded samples)."""
    if not collectives_on():
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without autograd (masks, labels, evaluation features)."""
    if not collectives_on():
        return tensor
    return _all_gather(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a new tensor on `tensor`'s device."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over ranks, as a new tensor on `tensor`'s device."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not collectives_on():
        return tensor
    placed, back = _placed(tensor)
    placed = placed.clone() if placed is tensor else placed
    dist.all_reduce(placed, op=op)
    return back(placed)


class AgreedFlags:
    """Small per-step flags every rank agrees on (their maximum over ranks) in one device collective,
    read back one step later, so that reading them never waits for the step in flight.

        flags.post(tensor)   # after step k: starts the all-reduce (asynchronous)
        flags.collect()      # after step k+1 (or at once, `now=True`): step k's agreed values

    On a GPU the agreed values are copied to pinned host memory behind an event; `collect` waits on
    that event, i.e. for step k's kernels only, while step k+1's keep the GPU busy."""

    def __init__(self) -> None:
        self._pending: tuple | None = None

    def post(self, values: torch.Tensor) -> None:
        """Starts agreeing on `values` (a 1-d tensor on this rank's device); one post at a time."""
        if self._pending is not None:
            raise RuntimeError("AgreedFlags.post: the previous flags were not collected")
        values, _ = _placed(values.float())
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True) if collectives_on() else None
        event, host = None, values
        if values.device.type == "cuda":
            if work is not None:
                work.wait()  # NCCL: the current stream waits for the collective, the host does not
                work = None
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (work, event, host)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def collect(self) -> list[float] | None:
        """The last posted flags, agreed by every rank (None when none is pending)."""
        if self._pending is None:
            return None
        work, event, host = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return host.tolist()
