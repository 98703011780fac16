"""How many torch threads a CPU rank trains with (`trainer.threads=0`): measured, not guessed.

Whether the loader's workers need cores of their own depends on the run: heavy decoding (big images,
audio) keeps them busy, and then the cores they need are the training's loss; light samples leave
them idle, and a core held back for them is a core wasted. So the first steps measure it: after a
warm-up, a window of steps with one less thread per loader worker (the rank's CPUs minus its
workers), then a window with every CPU of the rank; the faster stays for the rest of the run.
"""

from __future__ import annotations

import logging
from statistics import median

import torch

from contrastive.distributed import DistInfo

log = logging.getLogger("contrastive")


def candidates(cpus: int, loader_workers: int) -> list[int]:
    """The thread counts worth trying: the rank's CPUs less its loader workers, and all of them."""
    return sorted({max(1, cpus - loader_workers), max(1, cpus)})


class ThreadChoice:
    """Tries each candidate for `window` steps after `warmup` steps, then keeps the fastest
    (`__call__(step, seconds)` after every step; `chosen` once decided)."""

    def __init__(self, options: list[int], *, warmup: int = 3, window: int = 8):
        self.options, self.warmup, self.window = list(options), warmup, window
        self.times: dict[int, list[float]] = {n: [] for n in self.options}
        self.chosen: int | None = self.options[0] if len(self.options) == 1 else None
        self.current = self.options[0]
        torch.set_num_threads(self.current)

    def __call__(self, step: int, seconds: float) -> None:
        if self.chosen is not None or step <= self.warmup:
            return
        self.times[self.current].append(seconds)
        if len(self.times[self.current]) < self.window:
            return
        untried = [n for n in self.options if not self.times[n]]
        if untried:
            self.current = untried[0]
        else:
            speed = {n: median(t) for n, t in self.times.items()}
            self.current = self.chosen = min(speed, key=speed.get)
            log.info(
                "trainer.threads=0: %s; training on with %d",
                ", ".join(f"{n} thread(s) {1 / s:.2f} steps/s" for n, s in speed.items()),
                self.chosen,
            )
        torch.set_num_threads(self.current)


def compute_threads(requested: int, dist: DistInfo, loader_workers: int, cpus: int) -> int:
    """torch's intra-op threads for this rank: as asked, torch's own on a GPU, or (0 on CPU, where
    the run measures instead: contrastive.threads) the rank's `cpus` minus its loader workers."""
    if requested:
        return requested
    if dist.device.type != "cpu":
        return torch.get_num_threads()
    return max(1, cpus - loader_workers)
