"""The training loop (`train_loop`, read it top to bottom) and the `build_*` functions that set it up.

Nothing here reads a command line or a whole config: `contrastive.cli.train` composes the Hydra
config and calls these with explicit arguments.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from contrastive.accumulate import cached_accumulation
from contrastive.data.checks import check_bad_fraction
from contrastive.data.decode import BAD_SHARD
from contrastive.data.pipeline import DataPosition
from contrastive.distributed import is_main, world_size
from contrastive.optim import grad_norm
from contrastive.tracking import MetricsLogger

log = logging.getLogger("contrastive.train")


@dataclass
class TrainState:
    """Everything beyond weights and optimizer that a resumed run must continue from."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    counts: Counter = field(default_factory=Counter)  # bad-input and presence counters, all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "position": vars(self.position).copy(), "counts": dict(self.counts),
                "skipped_steps": self.skipped_steps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainState":
        return cls(step=d["step"], position=DataPosition(**d["position"]), counts=Counter(d["counts"]),
                   skipped_steps=d.get("skipped_steps", 0))


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """A context factory for the forward pass: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return lambda: torch.autocast(device_type=device.type, enabled=False)
    raise ValueError(f"trainer.precision: expected fp32 or bf16, got {precision!r}")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=True) if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out


def sum_counts(counts: Mapping[str, int]) -> Counter:
    """Adds up counters from every rank (keys may differ between ranks)."""
    if world_size() == 1:
        return Counter(counts)
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, dict(counts))
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


def train_loop(
    *,
    model: nn.Module,
    loss_fn: nn.Module,
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterator[dict[str, Any]],
    state: TrainState,
    max_steps: int,
    stop_at_step: int = 0,
    device: torch.device,
    autocast: Callable[[], Any],
    grad_clip: float,
    log_every: int,
    eval_every: int,
    save_every: int,
    evaluate: Callable[[int], dict[str, float]] | None,
    save: Callable[[TrainState], None],
    logger: MetricsLogger,
    progress: bool = True,
    accumulate: int = 1,
    max_bad_steps: int = 10,
    max_bad_fraction: float = 1.0,
    bad_check_after: int = 0,
    record_keys: Callable[[int, list[str]], None] | None = None,
) -> TrainState:
    """Trains `model` (an objective: batch -> (loss, logs), possibly wrapped by an engine) from
    `state.step` to `max_steps` (or `stop_at_step`, earlier, of the same schedule); each step takes
    `accumulate` batches as one (cached features)."""
    end = min(max_steps, stop_at_step) if stop_at_step else max_steps
    bar = None
    if progress and is_main():
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=state.step, unit="step", dynamic_ncols=True)
    window = {"samples": 0, "time": 0.0, "data_time": 0.0, "steps": 0}
    local_counts: Counter = Counter()
    bad_in_a_row = 0
    model.train()
    while state.step < end:
        t0 = time.perf_counter()
        # the loader's position advances with each batch handed out
        micro = [next(batches) for _ in range(accumulate)]
        t_data = time.perf_counter() - t0
        for batch in micro:
            local_counts.update(batch.pop("counts"))
        if record_keys is not None:
            record_keys(state.step + 1, [k for b in micro for k in b["__key__"] if k])
        micro = [to_device(batch, device) for batch in micro]

        optimizer.zero_grad(set_to_none=True)
        if accumulate == 1:
            with autocast():
                loss, logs = model(micro[0])
            loss.backward()
        else:  # the loss sees all micro-batches at once (GradCache); see contrastive.accumulate
            loss, logs = cached_accumulation(
                lambda b: model(b, embed_only=True), loss_fn, micro, autocast=autocast,
                replay_context=lambda i: model.no_sync() if i < accumulate - 1 and hasattr(model, "no_sync") else nullcontext(),
            )
        norm = grad_norm(parameters)
        global_loss = sum(v for k, v in logs.items() if k.startswith("loss/"))
        if not (math.isfinite(float(global_loss)) and math.isfinite(float(norm))):
            # Skip the update (every rank sees the same all-reduced values, so all skip together).
            state.skipped_steps += 1
            bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", state.step + 1, bad_in_a_row)
            if bad_in_a_row >= max_bad_steps:
                raise FloatingPointError(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping. The last "
                    "checkpoint predates them: lower the learning rate or check the data, then resume."
                )
        else:
            bad_in_a_row = 0
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        state.step += 1

        window["samples"] += sum(len(b["__key__"]) for b in micro) * world_size()
        window["time"] += time.perf_counter() - t0
        window["data_time"] += t_data
        window["steps"] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(global_loss):.3f}", sps=f"{window['samples'] / max(window['time'], 1e-9):.0f}")

        if state.step % log_every == 0 or state.step == end:
            state.counts.update(sum_counts(local_counts))
            local_counts.clear()
            check_bad_fraction(state.counts, max_fraction=max_bad_fraction, min_slots=bad_check_after)
            metrics = {k: float(v) for k, v in logs.items()}
            metrics.update({
                "loss": float(global_loss),
                "grad_norm": float(norm),
                "lr": optimizer.param_groups[0]["lr"],
                "samples_per_s": window["samples"] / max(window["time"], 1e-9),
                "data_wait_frac": window["data_time"] / max(window["time"], 1e-9),
                "epoch": state.position.epoch,
                "skipped_steps": state.skipped_steps,
            })
            metrics.update({f"data/{k}": v for k, v in state.counts.items() if not k.startswith(BAD_SHARD)})
            logger.log(state.step, metrics)
            window = dict.fromkeys(window, 0)
        if evaluate is not None and eval_every and state.step % eval_every == 0 and state.step < max_steps:
            logger.log(state.step, evaluate(state.step))
        if save_every and state.step % save_every == 0 and state.step < max_steps:
            save(state)

    if bar is not None:
        bar.close()
    state.counts.update(sum_counts(local_counts))
    return state
