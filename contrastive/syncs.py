"""Counting a step's host syncs: every read of a tensor's value into Python (`.item()`, `float(t)`,
`bool(t)`, `.tolist()`, `.cpu()`, `.numpy()`). On a GPU each one waits for the device's queue to
drain, so a step's count is what decides whether the host keeps ahead of the device; on a CPU the
same reads cost nothing, but they can be counted there all the same, which is how the tests hold the
GPU step's count down without a GPU (benchmarks/gpu/step_profile.py reports it per row). On a CPU
the count also holds reads of tensors that a GPU run keeps on the host anyway (torch's unfused
optimizers read their step counts), so it is an upper bound there.

    with HostReads() as reads:
        engine.train_step([batch])
    reads.count, reads.by_kind      # 1, {"tolist": 1}
"""

from __future__ import annotations

from collections import Counter

from torch.overrides import TorchFunctionMode

READS = frozenset({"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"})


class HostReads(TorchFunctionMode):
    """Counts the tensor reads into Python made inside the `with` block (a read inside another, such
    as `float(t)` calling `item`, counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.by_kind[name] += 1
        return func(*args, **(kwargs or {}))
