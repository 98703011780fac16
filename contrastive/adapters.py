"""The few places this package has to use a dependency's private or undocumented parts, each with why
and with a test (tests/test_adapters.py) that fails loudly when an upgrade changes it. Nothing else
in the package touches a name of another module that starts with an underscore
(tests/test_adapters.py checks that too).
"""

from __future__ import annotations

from typing import Any, Iterator


def stop_loader_workers(iterator: Iterator[Any]) -> None:
    """Stops a DataLoader iterator's worker processes now.

    PyTorch stops them when the iterator is garbage collected, but an exception's traceback (a
    worker's error, a stop signal) keeps the iterator alive past the point where the run ends; the
    workers ignore SIGTERM (a preemption's signal is the training process's to handle), so the
    interpreter's exit would wait for them forever. The iterator's `_shutdown_workers` is what its own
    `__del__` calls; a loader without worker processes has none."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def skip_cpu_shared_memory_allreduce() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce at its first process-group
    setup (~30 s, and a C++ compiler) unless `deepspeed.ops.__compatible_ops__` says the op cannot
    build; gloo's all-reduce is what our CPU runs use. There is no setting for it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def http_status(stream: Any) -> tuple[int, dict[str, str]]:
    """(status, headers) of the response behind an fsspec HTTP stream (`fs.open(url, block_size=0)`):
    fsspec keeps the aiohttp response as the stream's `r` and offers no other way to see whether a
    server honoured `Range` (206) or sent the whole object (200)."""
    response = stream.r
    return response.status, dict(response.headers)
