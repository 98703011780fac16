"""A training run, as `contrastive-train` runs it, in four named steps:

    run = build_run(spec, run_dir)   # process group, the checkpoint to resume, model and engine, data
    state = resume(run)              # the checkpoint's weights, optimizer and loader position, if any
    state = train(run, state)        # the loop (contrastive.train.train_loop) with its hooks
    metrics = finish(run, state)     # the last checkpoint, evaluation and export

`train_run(spec, run_dir)` is the four. `RunSpec` holds the typed settings the command line's config
became (contrastive.cli.train reads the config; nothing here does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from contrastive.allocation import check_allocation
from contrastive.builders import build_dataset, build_loss, build_modalities, build_objective, build_optimizer
from contrastive.checkpoint import (
    RemoteCheckpoints,
    load_checkpoint,
    read_meta,
    record_metrics,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from contrastive.data.checks import check_bad_fraction, summarize
from contrastive.data.pipeline import ShardDataset, batches
from contrastive.data.settings import DataConfig
from contrastive.data.shards import DataError
from contrastive.data.storage import configure_storage, redact
from contrastive.distill import Distillation, DistillSettings, check_inputs, load_teacher
from contrastive.distributed import DistInfo, init_distributed, run_on_main, same_on_every_rank
from contrastive.ds_checkpoint import needs_universal, optimizer_moments
from contrastive.ema import EMA_FILE, WeightEma, ema_settings
from contrastive.engine import Engine, EngineConfig, deepspeed_config
from contrastive.errors import ConfigError
from contrastive.evaluation import EvalConfig, Evaluator, eval_sets, format_table
from contrastive.export import export_checkpoint
from contrastive.flops import peak_flops, training_flops_per_sample
from contrastive.geometry import geometry
from contrastive.loss import LossSettings
from contrastive.model import ContrastiveObjective, ModelConfig
from contrastive.optim import OptimConfig
from contrastive.plots import write_plots
from contrastive.preemption import StopRequest
from contrastive.progress import Progress
from contrastive.threads import ThreadChoice, candidates, compute_threads
from contrastive.towers import apply_tower_settings, load_released_weights, unmask
from contrastive.tracking import KeyRecorder, LoggerConfig, MetricsLogger, read_metrics
from contrastive.train import Hooks, TrainerConfig, TrainState, replay_settings, resumed_state, train_loop

log = logging.getLogger("contrastive")


@dataclass
class RunSpec:
    """Everything a run is built from: the typed settings of each part of the config."""

    modalities: list[str]
    modality: dict[str, dict[str, Any]]  # each modality's fields
    model: ModelConfig
    loss: LossSettings
    data: DataConfig
    trainer: TrainerConfig
    engine: EngineConfig
    eval: EvalConfig
    optim: OptimConfig
    optimizer: Callable[..., torch.optim.Optimizer]  # called with the parameter groups
    scheduler: Callable[..., Any] | None  # called with (optimizer, total_steps=...)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    resume: str | None = None  # latest | a checkpoint or run directory
    export: bool = True
    config: dict[str, Any] = field(default_factory=dict)  # the config as written with the run (redacted)
    distill: DistillSettings = field(default_factory=DistillSettings)


@dataclass
class Run:
    """A built run: what the steps share."""

    spec: RunSpec
    run_dir: Path
    dist: DistInfo
    objective: ContrastiveObjective
    engine: Engine
    train_set: ShardDataset
    evaluator: Evaluator | None
    remote: RemoteCheckpoints | None
    checkpoint: Path | None  # the one to resume from
    threads: ThreadChoice | None = None  # trainer.threads=0 on CPU: the thread count being measured
    ema: WeightEma | None = None  # trainer.ema: the weights' average
    logger: MetricsLogger | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)


def train_run(spec: RunSpec, run_dir: Path) -> dict[str, float]:
    """Trains as `spec` says, in `run_dir`; returns the final evaluation metrics (empty without eval
    data, or when the run stopped before its end)."""
    run = build_run(spec, run_dir)
    state = resume(run)
    state = train(run, state)
    return finish(run, state)


# -- build ------------------------------------------------------------------------------------------


def build_run(spec: RunSpec, run_dir: Path) -> Run:
    """The process group, the checkpoint to resume from (which decides how the engine loads it), the
    model in its engine, the data, the evaluation."""
    trainer, data = spec.trainer, spec.data
    dist = init_distributed(
        trainer.device,
        timeout=trainer.dist_timeout,
        backend=trainer.dist_backend,
        force_collectives=trainer.force_collectives,
    )
    run_dir = same_on_every_rank(run_dir)
    cpus = check_allocation(dist, num_workers=data.num_workers)
    threads = None
    if trainer.threads or dist.device.type != "cpu":
        torch.set_num_threads(compute_threads(trainer.threads, dist, data.num_workers, cpus))
    else:  # measured in the first steps (contrastive.threads)
        threads = ThreadChoice(candidates(cpus, data.num_workers))
    torch.manual_seed(trainer.seed)
    configure_storage(data.storage_options)  # fsspec options for remote shards and checkpoints
    if data.train is None:
        raise DataError("data.train: no training data given (a directory of shards, or a list of them)")
    remote = None
    if trainer.checkpoint_dir:
        remote = RemoteCheckpoints(trainer.checkpoint_dir, trainer.keep_last, timeout=trainer.transfer_timeout)
        remote.check()
    checkpoint = resolve_resume(spec.resume, run_dir, remote)
    saved_world_size = read_meta(checkpoint).get("data_layout", {}).get("world_size") if checkpoint else None
    objective, engine = build_engine(spec, dist, load_universal=needs_universal(checkpoint, saved_world_size))
    where = dict(seed=trainer.seed, rank=dist.rank, world_size=dist.world_size)
    modalities = objective.model.modalities
    train_set = build_dataset(data.train, modalities, data, train=True, **where)
    sets = eval_sets(spec.eval, data.eval)
    evaluator = Evaluator(sets, modalities, spec.eval, data, **where) if sets else None
    ema_cfg = ema_settings(trainer.ema)
    ema = WeightEma(objective.model, ema_cfg) if ema_cfg else None
    return Run(spec, run_dir, dist, objective, engine, train_set, evaluator, remote, checkpoint, threads, ema)


def build_engine(spec: RunSpec, dist: DistInfo, *, load_universal: bool = False) -> tuple[ContrastiveObjective, Engine]:
    """The towers (released weights and tower settings applied) and the loss, in a DeepSpeed engine
    (set to load a universal checkpoint where the resume needs one)."""
    trainer = spec.trainer
    modalities = build_modalities(spec.modalities, spec.modality)
    objective = build_objective(
        modalities, embed_dim=spec.model.embed_dim, loss=build_loss(list(modalities), spec.loss)
    )
    load_released_weights(objective.model)  # modality.<name>.pretrained
    towers = dict(spec.model.towers)
    if trainer.compile:  # every tower, unless its own settings say otherwise
        towers = {name: {"compile": True, **dict(towers.get(name) or {})} for name in objective.model.encoders}
    apply_tower_settings(objective.model, towers)
    if spec.distill.teacher:
        if trainer.accumulate > 1:
            raise ConfigError("distill: not with trainer.accumulate > 1 (the teacher would need every micro-batch)")
        teacher = load_teacher(spec.distill.teacher)
        check_inputs(teacher, objective.model.modalities)
        objective.distill = Distillation(spec.distill, objective.loss.pairs, spec.model.embed_dim, teacher)
    objective.to(dist.device)
    optimizer, scheduler = build_optimizer(
        objective,
        optimizer=spec.optimizer,
        scheduler=spec.scheduler,
        total_steps=trainer.max_steps,
        no_decay=list(spec.optim.no_decay),
        towers=spec.model.towers,
    )
    config = deepspeed_config(
        spec.engine,
        micro_batch_size=spec.data.batch_size,
        world_size=dist.world_size,
        precision=trainer.precision,
        grad_clip=spec.optim.grad_clip,
        accumulate=trainer.accumulate,
        load_universal=load_universal,
    )
    engine = Engine(objective, optimizer, scheduler, config, attention=trainer.attention, tf32=trainer.tf32)
    return objective, engine


# -- resume -----------------------------------------------------------------------------------------


def resume(run: Run) -> TrainState:
    """The state to train from: a fresh one, or the checkpoint's (`resume`), whose data position is
    checked first, so that what cannot be honoured is refused before any weight is read."""
    trainer, checkpoint = run.spec.trainer, run.checkpoint
    if checkpoint is None:
        return TrainState()
    state = resumed_state(read_meta(checkpoint), run.train_set, accumulate=trainer.accumulate)
    _, mine = load_checkpoint(checkpoint, run.engine, timeout=trainer.transfer_timeout)
    if run.ema is not None:
        run.ema.load(checkpoint / EMA_FILE)
    if "rng" in mine:
        set_rng_state(mine["rng"])
    else:  # a rank the saving run did not have
        torch.manual_seed(trainer.seed + 7919 * run.dist.rank + state.step)
    moments = optimizer_moments(run.engine)
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d); optimizer moments: |exp_avg| %.6e, "
        "|exp_avg_sq| %.6e, step %d",
        checkpoint,
        state.step,
        state.position.epoch,
        state.position.batch,
        moments["exp_avg"],
        moments["exp_avg_sq"],
        moments["step"],
    )
    return state


# -- train ------------------------------------------------------------------------------------------


def train(run: Run, state: TrainState) -> TrainState:
    """The config written, the loggers opened, then the loop to max_steps (or a stop)."""
    trainer, dist = run.spec.trainer, run.dist
    open_loggers(run, state.step)
    tower_flops = training_flops_per_sample(run.objective.model)
    peak, peak_source = peak_flops(dist.device, trainer.precision, trainer.peak_tflops)
    if dist.is_main:
        log.info(
            "training FLOPs per sample: %s (%.3g GFLOP); peak %.3g TFLOP/s per device (%s)",
            ", ".join(f"{k} {v / 1e9:.3g} GFLOP" for k, v in tower_flops.items()),
            sum(tower_flops.values()) / 1e9,
            peak / 1e12,
            peak_source,
        )
    progress = Progress(
        start_step=state.step,
        total_steps=trainer.max_steps,
        world_size=dist.world_size,
        flops_per_sample=sum(tower_flops.values()),
        peak_flops=peak,
        bar=trainer.progress,
        enabled=dist.is_main,
        measured_peak=peak_source.startswith("measured"),
    )
    stream = batches(run.train_set, state.position, pin_memory=dist.device.type == "cuda")
    loop_hooks = hooks(run, state.step)
    loop_hooks.unmask = lambda: unmask_towers(run, progress)
    if run.ema is not None:
        loop_hooks.after_update = run.ema.after_step
    if run.threads is not None:
        loop_hooks.after_step = run.threads
    try:
        return train_loop(run.engine, stream, state, trainer, loop_hooks, run.logger, progress)
    finally:
        stream.close()  # stops the loader's workers, whatever ended the loop


def unmask_towers(run: Run, progress: Progress) -> None:
    """FLIP's unmasked tuning: patch dropout off for the rest of training, MFU counted on every token."""
    if unmask(run.objective.model):
        progress.flops_per_sample = sum(training_flops_per_sample(run.objective.model, unmasked=True).values())
        log.info("patch dropout off for the last %d steps (trainer.unmasked_steps)", run.spec.trainer.unmasked_steps)


def open_loggers(run: Run, start_step: int) -> None:
    """config.yaml (redacted), metrics.jsonl (one row a step: contrastive.tracking.continue_log) and
    wandb/TensorBoard where asked."""
    spec = run.spec
    if run.dist.is_main:
        OmegaConf.save(OmegaConf.create(spec.config), run.run_dir / "config.yaml")
    run.logger = MetricsLogger(
        run.run_dir,
        enabled=run.dist.is_main,
        wandb_mode=spec.logger.wandb,
        project=spec.logger.project,
        tensorboard=spec.logger.tensorboard,
        config=spec.config,
        start_step=start_step,
    )


def hooks(run: Run, start_step: int) -> Hooks:
    """What the loop calls out to: save, evaluate, the stop request, the bad-input check, key records."""
    data, trainer = run.spec.data, run.spec.trainer
    return Hooks(
        save=lambda state: save(run, state),
        evaluate=(lambda step: evaluate(run, step)) if run.evaluator is not None else None,
        stop_signal=run.stop.pending,
        stopped=run.stop.agreed,
        check_counts=lambda counts: check_bad_fraction(
            counts, max_fraction=data.max_bad_fraction, min_slots=data.bad_check_after
        ),
        record_keys=KeyRecorder(run.run_dir, run.dist.rank, start_step) if trainer.record_keys else None,
    )


def save(run: Run, state: TrainState) -> Path:
    """A checkpoint of `state` (collective), with the record a resume checks."""
    train_set, trainer = run.train_set, run.spec.trainer
    meta = {
        "state": state.to_dict(),
        # each stream's position follows from (epoch, batch) and the layout;
        # written out so a reader sees where every rank and worker stands
        "data_layout": train_set.layout(),
        "data_fingerprint": train_set.fingerprint(),
        "replay": replay_settings(trainer.seed, run.spec.data.shuffle_buffer),
        "accumulate": trainer.accumulate,
        "data_streams": {r: train_set.stream_position(state.position.batch) for r in range(run.dist.world_size)},
        "config": run.spec.config,
        "metrics": run.evaluations.get(state.step, {}),
    }
    rank_state = {"rng": rng_state()}
    files = {EMA_FILE: run.ema.save} if run.ema is not None else {}
    return save_checkpoint(
        run.run_dir,
        state.step,
        run.engine,
        keep_last=trainer.keep_last,
        remote=run.remote,
        rank_state=rank_state,
        meta=meta,
        files=files,
    )


def evaluate(run: Run, step: int) -> dict[str, float]:
    """Every eval set at `step` (collective): metrics `eval/...`, the table and the plots."""
    metrics, embedded = run.evaluator(run.objective.model, run.dist.device)
    if run.ema is not None and run.ema.shadow is not None:  # the average, scored beside the live weights
        averaged, _ = run.evaluator(run.ema.averaged_model(), run.dist.device)
        metrics.update({f"ema/{k}": v for k, v in averaged.items()})
    first = next(iter(embedded.values()), None)
    if first is not None:  # the held-out space's geometry, beside the training batches'
        pairs = run.objective.loss.pairs
        metrics.update(geometry(first["embeddings"], first["mask"], pairs))
    out = run.evaluations[step] = {f"eval/{k}": v for k, v in metrics.items()}
    if run.dist.is_main:
        where = ", ".join(f"{s.name or 'data.eval'} ({redact(s.shards)})" for s in run.evaluator.sets)
        failed = "".join(
            f"\nFAILED eval set {name} (left out): {error}" for name, error in run.evaluator.failed.items()
        )
        log.info("evaluation at step %d on %s\n%s%s", step, where, format_table(metrics), failed)
        write_plots(run.run_dir, read_metrics(run.run_dir) + [{"step": step, **out}], first)
    return out


# -- finish -----------------------------------------------------------------------------------------


def finish(run: Run, state: TrainState) -> dict[str, float]:
    """The last checkpoint; a stopped run ends there (and requeues itself on SLURM); a finished one
    is evaluated, the figures recorded with its checkpoint, summarised and exported."""
    trainer = run.spec.trainer
    final = save(run, state)
    if state.step < trainer.max_steps:
        why = f"signal {run.stop.signal}" if run.stop.signal else "trainer.stop_at_step"
        log.info(
            "stopped at step %d of %d (%s), checkpoint %s; resume=latest continues from it",
            state.step,
            trainer.max_steps,
            why,
            final,
        )
        if run.remote is not None:
            run.remote.await_upload()  # a requeued job resumes from the bucket: the checkpoint must be there
        run.logger.close()
        run.stop.requeue_if_slurm()
        return {}
    metrics = evaluate(run, state.step) if run.evaluator is not None else {}
    run.logger.log(state.step, metrics)
    run.logger.close()
    record_metrics(final, metrics, run.remote)
    if run.dist.is_main:
        if run.evaluator is None:
            write_plots(run.run_dir, read_metrics(run.run_dir))
        summarize(state.counts, state.skipped_steps)
    if run.spec.export:  # rank 0 gathers the weights (minutes for a big ZeRO-3 model): no collective waits on it
        averaged = run.ema is not None and run.ema.settings.export
        exported = run_on_main(
            lambda: export_checkpoint(final, run.run_dir / "export", ema=averaged),
            what="the export",
            timeout=trainer.transfer_timeout,
        )
        if run.dist.is_main:
            log.info("exported to %s", exported)
    if run.dist.is_main:
        log.info("run directory: %s", run.run_dir)
    return metrics
