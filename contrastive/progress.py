"""What a running job shows: throughput, MFU and ETA, as a progress bar on a terminal or as one plain
log line every `trainer.log_every` steps when stdout is a file (a SLURM job, `nohup`, a pipe):

    step 120/800 (15%) | epoch 0 | loss 3.214 (image-audio 1.104, image-text 1.052, audio-text 1.058) |
    lr 1.20e-03 | 412 samples/s | data wait 8% | MFU 2.1% | ETA 2m36s

(one line in the log). The same figures go to `metrics.jsonl` and the other loggers.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping

import torch

log = logging.getLogger("contrastive.train")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Throughput over the steps since the last report, MFU, ETA; the bar (with `bar`, on a terminal)
    or else the log line. Only the main rank shows either."""

    def __init__(
        self,
        *,
        start_step: int,
        total_steps: int,
        world_size: int,
        flops_per_sample: float = 0.0,
        peak_flops: float = 0.0,
        bar: bool = True,
        enabled: bool = True,
        terminal: bool | None = None,
        measured_peak: bool = False,
    ):
        self.total, self.world_size = total_steps, world_size
        # a peak measured by this process (a CPU's matmul), not a datasheet's: the MFU is relative to it
        self.mfu_mark = "~" if measured_peak else ""
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        terminal = sys.stdout.isatty() if terminal is None else terminal
        self.bar = None
        if enabled and bar and terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.lines = enabled and self.bar is None  # a plain line per report where no bar redraws
        self.first_step, self.started = start_step, time.perf_counter()
        self.samples = self.time = self.data_time = 0.0
        self.loss: float | None = None  # the last logging step's

    def step(self, step: int, *, samples: int, seconds: float, data_seconds: float) -> None:
        """After each step: this rank's samples (every rank has as many) and where the time went. The
        bar shows the loss of the last logging step (reading each step's would wait for the device)."""
        self.samples += samples * self.world_size
        self.time += seconds
        self.data_time += data_seconds
        if self.bar is not None:
            figures = self.figures()
            self.bar.update(1)
            self.bar.set_postfix(
                loss="-" if self.loss is None else f"{self.loss:.3f}",
                samples_s=f"{figures['samples_per_s']:.0f}",
                data_wait=f"{figures['data_wait_frac']:.0%}",
                mfu=f"{figures['mfu']:.1%}",
            )

    def figures(self) -> dict[str, float]:
        sps = self.samples / max(self.time, 1e-9)
        mfu = self.flops_per_sample * sps / (self.peak_flops * self.world_size) if self.peak_flops else float("nan")
        out = {"samples_per_s": sps, "mfu": mfu, "data_wait_frac": self.data_time / max(self.time, 1e-9)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's GPU, since the start
            out["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    def report(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """At a logging step: the window's figures (then a new window), and the line when there is no bar."""
        figures = self.figures()
        self.samples = self.time = self.data_time = 0.0
        self.loss = metrics.get("loss")
        elapsed = time.perf_counter() - self.started
        done = step - self.first_step
        eta = elapsed / done * (self.total - step) if done else float("nan")
        if self.lines:
            pairs = ", ".join(f"{k.removeprefix('loss/')} {v:.3f}" for k, v in metrics.items() if k.startswith("loss/"))
            mfu = f"MFU {self.mfu_mark}{figures['mfu']:.1%}" if figures["mfu"] == figures["mfu"] else "MFU -"
            # what the network and the data cost so far: retried reads, broken shards (their warnings
            # stop after the first few)
            data = "".join(
                f" | {label} {int(metrics[key])}"
                for key, label in (("data/retries", "retries"), ("data/broken_shards", "broken shards"))
                if metrics.get(key)
            )
            log.info(
                "step %d/%d (%.0f%%) | epoch %d | loss %.3f (%s) | lr %.2e | %.0f samples/s | data wait %.0f%% | "
                "%s | ETA %s%s",
                step,
                self.total,
                100 * step / max(self.total, 1),
                metrics.get("epoch", 0),
                metrics["loss"],
                pairs,
                metrics.get("lr", float("nan")),
                figures["samples_per_s"],
                100 * figures["data_wait_frac"],
                mfu,
                format_duration(eta) if eta == eta else "-",
                data,
            )
        return figures

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
