"""The training loop (`train_loop`, read it top to bottom), its settings and its state.

Nothing here reads a command line or a whole config: `contrastive.cli.train` composes the Hydra
config and calls these with explicit arguments.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch

from contrastive.data.decode import PER_SHARD, broken_shards
from contrastive.data.pipeline import DataPosition, ShardDataset
from contrastive.data.shards import DataError
from contrastive.distributed import AgreedFlags, gather_objects
from contrastive.engine import APPLIED, BAD_GRADIENT
from contrastive.progress import Progress
from contrastive.tracking import MetricsLogger

log = logging.getLogger("contrastive.train")


@dataclass
class TrainerConfig:
    """`trainer.*`: the length of the run, its precision, and how it logs, evaluates and saves."""

    max_steps: int = 1000
    accumulate: int = 1  # batches per step, taken as one batch by the loss (cached features)
    stop_at_step: int = 0  # checkpoint and exit at this step of a longer schedule (0 = run to max_steps)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with dynamic loss scaling) | amp_bf16 (autocast)
    attention: str = "auto"  # SDPA kernels: auto | default | math | flash | efficient | cudnn (contrastive.engine)
    tf32: bool = True  # on GPUs, fp32 matmuls and convolutions in TF32 (as open_clip's trainer); cuDNN autotunes
    compile: bool = False  # torch.compile every tower in place (model.towers.<name>.compile sets it per tower)
    threads: int = 0  # torch intra-op threads per rank; 0: on CPU, measured in the first steps (contrastive.threads)
    unmasked_steps: int = 0  # the last N steps without patch dropout (FLIP's unmasked tuning)
    # the weights' moving average (contrastive.ema): {decay: 0.9998, start_step: 0, every: 1, export: false};
    # empty: none
    ema: Dict[str, Any] = field(default_factory=dict)
    log_every: int = 10  # steps between metrics rows (and log lines when stdout is not a terminal)
    # steps between measuring steps (the batch's geometry, each pair's share of the gradients, the
    # towers' gradient norms), each logged in its own row; and the last step. 0: the last step only
    measure_every: int = 100
    eval_every: int = 0  # steps; 0 evaluates at the end only
    save_every: int = 0  # steps; 0 saves at the end only
    keep_last: int = 2  # checkpoints kept
    # a URL (s3://, gs://, ...) checkpoints are uploaded to when complete, `latest` moved last; resume=latest
    # in an empty run directory fetches from there (see contrastive.checkpoint)
    checkpoint_dir: Optional[str] = None
    dist_timeout: int = 1800  # seconds any collective waits before the run gives up (NCCL's and gloo's timeout)
    # the process group's backend: auto (gloo on CPU; cpu:gloo,cuda:nccl on GPUs, serving host and device
    # tensors alike) | nccl | gloo | cuda:gloo | ... (contrastive.distributed.backend_spec)
    dist_backend: str = "auto"
    force_collectives: bool = False  # run every collective even with one rank (checks the multi-rank path on one GPU)
    # seconds rank 0's long work may take: a checkpoint's upload, a fetch, a universal conversion, the
    # export (0: no limit); the other ranks wait for it in short heartbeats, not in one collective
    transfer_timeout: int = 14400
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient before the run stops
    progress: bool = True  # a progress bar on a terminal; else (or false) a log line every log_every steps
    peak_tflops: float = 0.0  # one device's peak for MFU; 0: datasheet (known GPUs) or measured (CPU)
    record_keys: bool = False  # write the sample keys of every step to <run>/keys/rank<r>.jsonl


@dataclass
class TrainState:
    """Everything beyond weights and optimizer that a resumed run must continue from."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    counts: Counter = field(default_factory=Counter)  # bad-input and presence counters, all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "position": vars(self.position).copy(),
            "counts": dict(self.counts),
            "skipped_steps": self.skipped_steps,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainState":
        return cls(
            step=d["step"],
            position=DataPosition(**d["position"]),
            counts=Counter(d["counts"]),
            skipped_steps=d.get("skipped_steps", 0),
        )


def global_batch(layout: Mapping[str, int], accumulate: int) -> int:
    """Samples a step contrasts: ranks x data.batch_size x trainer.accumulate (cached features)."""
    return layout["world_size"] * layout["batch_size"] * accumulate


def resumed_state(meta: Mapping[str, Any], dataset: ShardDataset, *, accumulate: int) -> TrainState:
    """The state a run continues from, from its checkpoint's record `meta`: as saved, or, on another
    layout (ranks, loader workers, batch size), with the loader's position carried over: the rest of
    the interrupted epoch, each of its samples once, then whole epochs in the new layout.

    The rule for the global batch: it is the experiment's, so it is kept. Ranks x data.batch_size x
    trainer.accumulate must equal the checkpoint's (accumulation contrasts its batches as one, so 2
    ranks x 64 become 1 rank x 64 x accumulate 2); another one is refused with the settings that keep
    it. The data must be the same shards (their names and counts; they may be read from elsewhere),
    and an interrupted epoch is replayed only with the seed and shuffle buffer it was shuffled with."""
    state = TrainState.from_dict(meta["state"])
    saved, now = meta["data_layout"], dataset.layout()
    mid_epoch = state.position.batch > 0 or bool(state.position.plan)
    if mid_epoch:
        check_replay(meta, dataset)
    config = meta.get("config", {})
    saved_accumulate = meta.get("accumulate", config.get("trainer", {}).get("accumulate", 1))
    before, after = global_batch(saved, saved_accumulate), global_batch(now, accumulate)
    if saved == now and before == after:
        return state
    if before != after:
        ranks, per_rank = now["world_size"], saved["batch_size"]
        ways = []
        if before % ranks == 0:
            ways.append(f"data.batch_size={before // ranks} trainer.accumulate=1")
            if (before // ranks) % per_rank == 0 and before // ranks != per_rank:
                ways.append(f"data.batch_size={per_rank} trainer.accumulate={before // ranks // per_rank}")
        raise DataError(
            f"resume: the checkpoint trained with a global batch of {before} ({saved['world_size']} ranks x "
            f"data.batch_size {saved['batch_size']} x trainer.accumulate {saved_accumulate}); this run has "
            f"{after} ({ranks} x {now['batch_size']} x {accumulate}). The global batch is kept across "
            + (
                f"allocations: on {ranks} ranks set {' or '.join(ways)}"
                if ways
                else f"allocations, and {ranks} ranks cannot hold {before}"
            )
        )
    state.position = dataset.carry_over(state.position, saved)
    log.info(
        "resume on another layout: %s -> %s; the rest of epoch %d (%d samples) is split over the new "
        "layout, each sample once",
        saved,
        now,
        state.position.epoch,
        dataset.epoch_total(state.position.epoch) if state.position.plan else 0,
    )
    return state


def replay_settings(seed: int, shuffle_buffer: int) -> dict[str, int]:
    """What the order of an epoch's samples follows, beside the data and the layout (saved with each
    checkpoint; a resume mid-epoch needs them unchanged)."""
    return {"trainer.seed": seed, "data.shuffle_buffer": shuffle_buffer}


def check_replay(meta: Mapping[str, Any], dataset: ShardDataset) -> None:
    """Refuses, naming the setting, a mid-epoch resume that cannot replay the interrupted epoch: other
    data, or another seed or shuffle buffer (some samples would be trained twice, others never)."""
    if meta.get("data_fingerprint", dataset.fingerprint()) != dataset.fingerprint():
        raise DataError(
            "resume: data.train is not the data the checkpoint was trained on (other shards, or other "
            "sample counts), so the interrupted epoch cannot be finished exactly. Resume with the same "
            "shards (they may be at another place), or start a new run from an export of the checkpoint"
        )
    config = meta.get("config", {})
    saved = meta.get("replay") or replay_settings(
        config.get("trainer", {}).get("seed", dataset.seed),
        config.get("data", {}).get("shuffle_buffer", dataset.shuffle_buffer),
    )
    now = replay_settings(dataset.seed, dataset.shuffle_buffer)
    for key, value in saved.items():
        if now[key] != value:
            raise DataError(
                f"resume: {key}={now[key]}, but the checkpoint stopped mid-epoch with {key}={value}: the rest of "
                f"that epoch is replayed from the order {key} made, so another value would train some of its "
                f"samples twice and others never. Resume with {key}={value}, or start a new run from an "
                "export of the checkpoint"
            )


def sum_counts(counts: Mapping[str, int]) -> Counter:
    """Adds up counters from every rank (keys may differ between ranks)."""
    total: Counter = Counter()
    for part in gather_objects(dict(counts)):
        total.update(part)
    return total


@dataclass
class Hooks:
    """What the loop calls out to; the caller decides what each one does."""

    save: Callable[[TrainState], Any]  # write a checkpoint of this state
    evaluate: Callable[[int], dict[str, float]] | None = None  # metrics at this step
    stop_signal: Callable[[], int] = lambda: 0  # this rank's stop signal (0: none), agreed with the others each step
    stopped: Callable[[int], None] = lambda signum: None  # told the signal the ranks agreed to stop for
    check_counts: Callable[[Counter], None] = lambda counts: None  # raises when too much input was bad
    record_keys: Callable[[int, list[str]], None] | None = None  # each step's sample keys
    unmask: Callable[[], None] = lambda: None  # patch dropout off, for the last trainer.unmasked_steps
    # after each update, inside the step's time (the weights' average: part of what a step costs)
    after_update: Callable[[int], None] = lambda step: None
    after_step: Callable[[int, float], None] = lambda step, seconds: None  # each step's wall time


def host_values(logs: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as floats, the device's read back in one transfer (not one round trip each)."""
    tensors = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in logs.items() if k not in tensors}
    if tensors:
        stacked = torch.stack([v.detach().reshape(()).to(torch.float64) for v in tensors.values()])
        out.update(zip(tensors, stacked.tolist()))
    return out


class StepVerdicts:
    """Each step's verdict (applied, or skipped for a non-finite loss or gradient) and the stop signals,
    agreed by every rank in one small collective a step (contrastive.distributed.AgreedFlags) and read
    a step later, so that an ordinary step never waits for the device. Counts the skipped steps, ends
    the run after `max_bad` in a row, and says when the ranks agreed to stop."""

    def __init__(self, max_bad: int, hooks: "Hooks"):
        self.flags, self.max_bad, self.hooks = AgreedFlags(), max_bad, hooks
        self.posted_step, self.bad_in_a_row, self.stop = 0, 0, False

    def post(self, step: int, status: torch.Tensor) -> None:
        signal = torch.full((), float(self.hooks.stop_signal()), device=status.device)
        self.flags.post(torch.stack([status.reshape(()).float(), signal]))
        self.posted_step = step

    def settle(self, state: "TrainState") -> bool:
        """Acts on the posted step's agreed flags, if any; True once the ranks agreed to stop."""
        values = self.flags.collect()
        if values is None:
            return self.stop
        status, signal = int(values[0]), int(values[1])
        if status == APPLIED:
            self.bad_in_a_row = 0
        else:
            state.skipped_steps += 1
            self.bad_in_a_row += 1
            what = "gradient" if status == BAD_GRADIENT else "loss"
            log.warning(
                "step %d: non-finite %s, update skipped (%d in a row)", self.posted_step, what, self.bad_in_a_row
            )
            if self.bad_in_a_row >= self.max_bad:
                raise FloatingPointError(
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient; stopping. The last "
                    "checkpoint predates them: lower the learning rate or check the data, then resume."
                )
        if signal:
            self.stop = True
            self.hooks.stopped(signal)
        return self.stop


def step_metrics(engine: Any, state: TrainState, logs: Mapping[str, Any], progress: Progress) -> dict:
    """A logging step's row: the loss's metrics, learning rates, gradient norm, the data's counters
    (all ranks) and the progress figures (which also print the log line)."""
    metrics = host_values(logs)
    metrics.update({f"lr/{name}": lr for name, lr in engine.lrs().items()})
    metrics.update(
        loss=sum(v for k, v in metrics.items() if k.startswith("loss/")),
        grad_norm=engine.grad_norm(),
        lr=engine.lr,
        epoch=state.position.epoch,
        skipped_steps=state.skipped_steps,
    )
    metrics.update({f"data/{k}": v for k, v in state.counts.items() if not k.startswith(PER_SHARD)})
    metrics["data/broken_shards"] = len(broken_shards(state.counts))
    metrics.update(progress.report(state.step, metrics))
    return metrics


def train_loop(
    engine: Any,
    batches: Iterator[dict[str, Any]],
    state: TrainState,
    settings: TrainerConfig,
    hooks: Hooks,
    logger: MetricsLogger,
    progress: Progress,
) -> TrainState:
    """Trains from `state.step` to `settings.max_steps` (or `stop_at_step`, earlier, of the same
    schedule, or until `hooks.stop_requested()`). Each step takes `settings.accumulate` batches,
    which the loss sees as one batch (contrastive.engine.Engine.train_step)."""
    end = min(settings.max_steps, settings.stop_at_step) if settings.stop_at_step else settings.max_steps
    local_counts: Counter = Counter()
    verdicts = StepVerdicts(settings.max_bad_steps, hooks)
    engine.train()
    unmasked = False
    while state.step < end:
        if settings.unmasked_steps and not unmasked and state.step >= settings.max_steps - settings.unmasked_steps:
            hooks.unmask()  # also after a resume past the point
            unmasked = True
        t0 = time.perf_counter()
        # the loader's position advances with each batch handed out
        micro = [next(batches) for _ in range(settings.accumulate)]
        t_data = time.perf_counter() - t0
        for batch in micro:
            local_counts.update(batch.pop("counts"))
        step = state.step + 1
        if hooks.record_keys is not None:
            hooks.record_keys(step, [k for b in micro for k in b["__key__"] if k])

        # a measuring step also takes the batch's geometry and the gradients' shares and norms
        measuring = step == end or bool(settings.measure_every and step % settings.measure_every == 0)
        engine.measure = measuring
        logs, status = engine.train_step(micro)
        state.step = step
        hooks.after_update(step)
        seconds = time.perf_counter() - t0
        progress.step(step, samples=sum(len(b["__key__"]) for b in micro), data_seconds=t_data, seconds=seconds)
        hooks.after_step(step, seconds)
        # the step before's verdict and stop signals, agreed; then this step's, to read after the next
        stop = verdicts.settle(state)
        verdicts.post(step, status)

        logging = step % settings.log_every == 0 or step == end or measuring
        evaluating = (
            hooks.evaluate is not None
            and settings.eval_every
            and step % settings.eval_every == 0
            and step < settings.max_steps
        )
        saving = settings.save_every and step % settings.save_every == 0 and step < end
        if logging or evaluating or saving:
            stop = verdicts.settle(state)  # what they record counts this step's verdict too
        if logging:
            state.counts.update(sum_counts(local_counts))
            local_counts.clear()
            hooks.check_counts(state.counts)
            logger.log(step, step_metrics(engine, state, logs, progress))
        if evaluating:
            logger.log(step, hooks.evaluate(step))
        if saving:
            hooks.save(state)
        if stop:
            break  # the caller checkpoints

    verdicts.settle(state)
    progress.close()
    state.counts.update(sum_counts(local_counts))
    return state
