"""The training loop (`train_loop`, read it top to bottom) and the `build_*` functions that set it up.

Nothing here reads a command line or a whole config: `contrastive.cli.train` composes the Hydra
config and calls these with explicit arguments.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from contrastive.accumulate import cached_accumulation
from contrastive.data.checks import check_bad_fraction
from contrastive.data.decode import BAD_SHARD
from contrastive.data.pipeline import DataPosition
from contrastive.distributed import is_main, world_size
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


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (and the mask dict's tensors) to `device`; the rest as is."""
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
    engine: Any,
    loss_fn: nn.Module,
    batches: Iterator[dict[str, Any]],
    state: TrainState,
    max_steps: int,
    stop_at_step: int = 0,
    device: torch.device,
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
    stop_requested: Callable[[], bool] | None = None,
    flops_per_sample: float = 0.0,
    peak_flops: float = 0.0,
) -> TrainState:
    """Trains from `state.step` to `max_steps` (or `stop_at_step`, earlier, of the same schedule, or
    until `stop_requested()`, asked after every step).

    `engine` wraps the objective (contrastive.engine.Engine): engine(batch) -> (loss, logs),
    engine.backward(loss), engine.step() -> applied. Each step takes `accumulate` batches, which
    the loss sees as one batch (cached features, see contrastive.accumulate)."""
    end = min(max_steps, stop_at_step) if stop_at_step else max_steps
    bar = None
    if progress and is_main():
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=state.step, unit="step", dynamic_ncols=True)
    window = {"samples": 0, "time": 0.0, "data_time": 0.0}
    local_counts: Counter = Counter()
    bad_in_a_row = 0

    def finite(loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> bool:
        # The logged pair losses are all-reduced: every rank reaches the same verdict.
        return math.isfinite(float(sum(v for k, v in logs.items() if k.startswith("loss/"))))

    engine.engine.train()
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

        applied = []
        if accumulate == 1:
            loss, logs = engine(micro[0])
            ok = finite(loss, logs)
            if ok:
                engine.backward(loss)
                applied.append(engine.step())
        else:  # the loss sees all micro-batches at once (GradCache)
            def backward(surrogate: torch.Tensor) -> None:
                engine.backward(surrogate)
                applied.append(engine.step())

            loss, logs = cached_accumulation(lambda b: engine(b, embed_only=True), loss_fn, micro,
                                             backward=backward, proceed=finite)
            ok = finite(loss, logs)
        global_loss = float(sum(v for k, v in logs.items() if k.startswith("loss/")))
        if ok and all(applied):
            bad_in_a_row = 0
        else:
            state.skipped_steps += 1
            bad_in_a_row += 1
            log.warning("step %d: non-finite %s, update skipped (%d in a row)", state.step + 1,
                        "gradient" if ok else "loss", bad_in_a_row)
            if bad_in_a_row >= max_bad_steps:
                raise FloatingPointError(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping. The last "
                    "checkpoint predates them: lower the learning rate or check the data, then resume."
                )
        state.step += 1

        window["samples"] += sum(len(b["__key__"]) for b in micro) * world_size()
        window["time"] += time.perf_counter() - t0
        window["data_time"] += t_data
        sps = window["samples"] / max(window["time"], 1e-9)
        mfu = flops_per_sample * sps / (peak_flops * world_size()) if peak_flops else float("nan")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{global_loss:.3f}", samples_s=f"{sps:.0f}",
                            data_wait=f"{window['data_time'] / max(window['time'], 1e-9):.0%}", mfu=f"{mfu:.1%}")

        if state.step % log_every == 0 or state.step == end:
            state.counts.update(sum_counts(local_counts))
            local_counts.clear()
            check_bad_fraction(state.counts, max_fraction=max_bad_fraction, min_slots=bad_check_after)
            metrics = {k: float(v) for k, v in logs.items()}
            metrics.update({
                "loss": global_loss,
                "grad_norm": engine.grad_norm(),
                "lr": engine.lr,
                "samples_per_s": sps,
                "mfu": mfu,
                "data_wait_frac": window["data_time"] / max(window["time"], 1e-9),
                "epoch": state.position.epoch,
                "skipped_steps": state.skipped_steps,
            })
            metrics.update({f"data/{k}": v for k, v in state.counts.items() if not k.startswith(BAD_SHARD)})
            logger.log(state.step, metrics)
            window = dict.fromkeys(window, 0)
        if evaluate is not None and eval_every and state.step % eval_every == 0 and state.step < max_steps:
            logger.log(state.step, evaluate(state.step))
        if save_every and state.step % save_every == 0 and state.step < end:
            save(state)
        if stop_requested is not None and stop_requested():
            break  # the caller checkpoints

    if bar is not None:
        bar.close()
    state.counts.update(sum_counts(local_counts))
    return state
