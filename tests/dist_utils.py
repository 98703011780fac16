"""Real multi-process runs for tests: `run_ranks(world, fn, *args)` starts `world` gloo processes
(forked from a server that has the imports done, or spawned on a GPU machine), calls fn(*args) in
each after joining the process group, and returns every rank's result."""

from __future__ import annotations

import io
import os
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from ports import free_port


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, device: str = "cpu", init=None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    try:
        import torch

        torch.set_num_threads(1)
        from contrastive.distributed import init_distributed

        init_distributed(device, **(init or {}))
        # Sent as bytes: tensors put on a queue directly travel by shared memory, which vanishes
        # when this process exits before the parent has read them.
        buf = io.BytesIO()
        torch.save(fn(*args), buf)
        queue.put((rank, buf.getvalue(), None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, None, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# What every rank imports: loaded once into multiprocessing's fork server, so that each rank starts
# without paying for it (~6 s a process). Not on a GPU machine: CUDA does not survive a fork.
PRELOAD = ["torch", "numpy", "open_clip", "deepspeed", "contrastive.distributed", "contrastive.engine", "datasets"]


def _context():
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(
    world: int, fn: Callable, *args: Any, timeout: float = 300, device: str = "cpu", init: dict | None = None
) -> list[Any]:
    """fn(*args) on `world` ranks; `init`: init_distributed's keywords (backend, force_collectives)."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, device, init)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, value, error = queue.get(timeout=timeout)
            if error:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
