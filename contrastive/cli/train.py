"""`contrastive-train`: the Hydra application that trains, evaluates, checkpoints and exports.

    contrastive-train experiment=demo
    contrastive-train experiment=demo modalities=[image,text] loss.temperature.learnable=false
    contrastive-train experiment=demo hydra.run.dir=runs/mine resume=latest
    contrastive-train hydra.searchpath=[file:///my/configs] experiment=mine     (your own config files)
    torchrun --nproc_per_node 2 $(which contrastive-train) experiment=demo engine.zero_stage=2
    deepspeed --num_gpus 2 $(which contrastive-train) experiment=demo
    srun --ntasks 8 contrastive-train ...        (see contrastive-submit)

This is the only place that reads the composed config; everything below it takes typed settings.
The same code runs under every launcher: rank and world size come from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contrastive.allocation import check_allocation
from contrastive.builders import (
    build_dataset,
    build_loss,
    build_modalities,
    build_objective,
    build_optimizer,
    import_modules,
)
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
from contrastive.config import CONFIG_DIR, as_schema, refuse_credentials, register_configs, saved_config, validate
from contrastive.data.checks import check_bad_fraction
from contrastive.data.decode import broken_shards
from contrastive.data.pipeline import batches
from contrastive.data.shards import DataError
from contrastive.data.storage import configure_storage, redact
from contrastive.distributed import DistInfo, init_distributed, run_on_main, same_on_every_rank
from contrastive.engine import Engine, deepspeed_config
from contrastive.evaluation import Evaluator, eval_sets, format_table
from contrastive.export import export_checkpoint
from contrastive.flops import peak_flops, training_flops_per_sample
from contrastive.plots import write_plots
from contrastive.preemption import StopRequest
from contrastive.progress import Progress
from contrastive.towers import apply_tower_settings, load_released_weights
from contrastive.tracking import MetricsLogger, read_metrics
from contrastive.train import Hooks, TrainState, replay_settings, resumed_state, train_loop

log = logging.getLogger("contrastive")


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def typed(node: Any) -> Any:
    """A config node as the settings object its schema names (TrainerConfig, a loss's settings...)."""
    return OmegaConf.to_object(node)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Trains as `cfg` says, in `run_dir`; returns the final evaluation metrics (empty without eval data)."""
    import_modules(cfg.imports)
    refuse_credentials(cfg)
    cfg = as_schema(cfg)
    validate(cfg)
    trainer, data_cfg = typed(cfg.trainer), typed(cfg.data)
    dist = init_distributed(trainer.device, timeout=trainer.dist_timeout)
    run_dir = same_on_every_rank(run_dir)
    cpus = check_allocation(dist, num_workers=data_cfg.num_workers)
    torch.set_num_threads(compute_threads(trainer.threads, dist, data_cfg.num_workers, cpus))
    torch.manual_seed(trainer.seed)

    modalities = build_modalities(cfg.modalities, plain(cfg.modality))
    objective = build_objective(
        modalities, embed_dim=cfg.model.embed_dim, loss=build_loss(list(modalities), typed(cfg.loss))
    )
    towers = typed(cfg.model).towers
    load_released_weights(objective.model)  # modality.<name>.pretrained
    apply_tower_settings(objective.model, towers)
    objective.to(dist.device)
    optimizer, scheduler = build_optimizer(
        objective,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.scheduler else None,
        total_steps=trainer.max_steps,
        no_decay=list(cfg.optim.no_decay),
        towers=towers,
    )
    engine = Engine(
        objective,
        optimizer,
        scheduler,
        deepspeed_config(
            typed(cfg.engine),
            micro_batch_size=data_cfg.batch_size,
            world_size=dist.world_size,
            precision=trainer.precision,
            grad_clip=cfg.optim.grad_clip,
            accumulate=trainer.accumulate,
        ),
        attention=trainer.attention,
        tf32=trainer.tf32,
    )
    configure_storage(data_cfg.storage_options)  # fsspec options for remote shards and checkpoints
    if data_cfg.train is None:
        raise DataError("data.train: no training data given (a directory of shards, or a list of them)")
    where = dict(seed=trainer.seed, rank=dist.rank, world_size=dist.world_size)
    train_set = build_dataset(plain(data_cfg.train), modalities, data_cfg, train=True, **where)
    sets = eval_sets(typed(cfg.eval), data_cfg.eval)
    evaluator = Evaluator(sets, modalities, typed(cfg.eval), data_cfg, **where) if sets else None

    state = TrainState()
    remote = (
        RemoteCheckpoints(trainer.checkpoint_dir, trainer.keep_last, timeout=trainer.transfer_timeout)
        if trainer.checkpoint_dir
        else None
    )
    if remote is not None:
        remote.check()
    checkpoint = resolve_resume(cfg.resume, run_dir, remote)
    if checkpoint is not None:
        # the data position first: what cannot be honoured is refused before any weight is read
        state = resumed_state(read_meta(checkpoint), train_set, accumulate=trainer.accumulate)
        _, mine = load_checkpoint(checkpoint, engine, timeout=trainer.transfer_timeout)
        if "rng" in mine:
            set_rng_state(mine["rng"])
        else:  # a rank the saving run did not have
            torch.manual_seed(trainer.seed + 7919 * dist.rank + state.step)
        moments = engine.optimizer_moments()
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

    config = saved_config(cfg)  # every credential redacted, also one the environment brought in
    if dist.is_main:
        OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    logger = MetricsLogger(
        run_dir,
        enabled=dist.is_main,
        wandb_mode=cfg.logger.wandb,
        project=cfg.logger.project,
        tensorboard=cfg.logger.tensorboard,
        config=config,
    )
    evaluations: dict[int, dict[str, float]] = {}

    def evaluate(step: int) -> dict[str, float]:
        metrics, embedded = evaluator(objective.model, dist.device)
        out = evaluations[step] = {f"eval/{k}": v for k, v in metrics.items()}
        if dist.is_main:
            where = ", ".join(f"{s.name or 'data.eval'} ({redact(s.shards)})" for s in sets)
            failed = "".join(
                f"\nFAILED eval set {name} (left out): {error}" for name, error in evaluator.failed.items()
            )
            log.info("evaluation at step %d on %s\n%s%s", step, where, format_table(metrics), failed)
            first = next(iter(embedded.values()), None)
            write_plots(run_dir, read_metrics(run_dir) + [{"step": step, **out}], first)
        return out

    def save(state: TrainState) -> Path:
        return save_checkpoint(
            run_dir,
            state.step,
            engine,
            keep_last=trainer.keep_last,
            remote=remote,
            rank_state={"rng": rng_state()},
            meta={
                "state": state.to_dict(),
                # each stream's position follows from (epoch, batch) and the layout;
                # written out so a reader sees where every rank and worker stands
                "data_layout": train_set.layout(),
                "data_fingerprint": train_set.fingerprint(),
                "replay": replay_settings(trainer.seed, data_cfg.shuffle_buffer),
                "accumulate": trainer.accumulate,
                "data_streams": {r: train_set.stream_position(state.position.batch) for r in range(dist.world_size)},
                "config": config,
                "metrics": evaluations.get(state.step, {}),
            },
        )

    tower_flops = training_flops_per_sample(objective.model)
    peak, peak_source = peak_flops(dist.device, trainer.precision, trainer.peak_tflops)
    if dist.is_main:
        log.info(
            "training FLOPs per sample: %s (%.3g GFLOP); peak %.3g TFLOP/s per device (%s)",
            ", ".join(f"{k} {v / 1e9:.3g} GFLOP" for k, v in tower_flops.items()),
            sum(tower_flops.values()) / 1e9,
            peak / 1e12,
            peak_source,
        )
    stop = StopRequest()
    hooks = Hooks(
        save=save,
        evaluate=evaluate if evaluator is not None else None,
        stop_requested=stop.requested,
        check_counts=lambda counts: check_bad_fraction(
            counts, max_fraction=data_cfg.max_bad_fraction, min_slots=data_cfg.bad_check_after
        ),
        record_keys=KeyRecorder(run_dir, dist.rank) if trainer.record_keys else None,
    )
    progress = Progress(
        start_step=state.step,
        total_steps=trainer.max_steps,
        world_size=dist.world_size,
        flops_per_sample=sum(tower_flops.values()),
        peak_flops=peak,
        bar=trainer.progress,
        enabled=dist.is_main,
    )
    stream = batches(train_set, state.position, pin_memory=dist.device.type == "cuda")
    try:
        state = train_loop(engine, stream, state, trainer, hooks, logger, progress)
    finally:
        stream.close()  # stops the loader's workers, whatever ended the loop
    final = save(state)
    if state.step < trainer.max_steps:
        why = f"signal {stop.signal}" if stop.signal else "trainer.stop_at_step"
        log.info(
            "stopped at step %d of %d (%s), checkpoint %s; resume=latest continues from it",
            state.step,
            trainer.max_steps,
            why,
            final,
        )
        if remote is not None:
            remote.await_upload()  # a requeued job resumes from the bucket: the checkpoint must be there
        logger.close()
        stop.requeue_if_slurm()
        return {}
    metrics = evaluate(state.step) if evaluator is not None else {}
    logger.log(state.step, metrics)
    logger.close()
    record_metrics(final, metrics, remote)
    if dist.is_main and evaluator is None:
        write_plots(run_dir, read_metrics(run_dir))
    if dist.is_main:
        bad = {k: v for k, v in state.counts.items() if k.startswith("bad/")}
        broken = broken_shards(state.counts)
        log.info(
            "data: %d samples trained on; bad input skipped and counted: %s; broken shards: %s; steps skipped "
            "for non-finite values: %d",
            state.counts.get("samples", 0),
            bad or "none",
            f"{len(broken)} ({', '.join(broken)})" if broken else "none",
            state.skipped_steps,
        )
    if cfg.export:  # rank 0 gathers the weights (minutes for a big ZeRO-3 model): no collective waits on it
        exported = run_on_main(
            lambda: export_checkpoint(final, run_dir / "export"), what="the export", timeout=trainer.transfer_timeout
        )
        if dist.is_main:
            log.info("exported to %s", exported)
    if dist.is_main:
        log.info("run directory: %s", run_dir)
    return metrics


def compute_threads(requested: int, dist: DistInfo, loader_workers: int, cpus: int) -> int:
    """torch's intra-op threads for this rank: as asked, or (0) on CPU the rank's `cpus` minus its
    loader workers, which need cores of their own (2 cores: 1.6x the samples/s of torch's default,
    which oversubscribes them)."""
    if requested:
        return requested
    if dist.device.type != "cpu":
        return torch.get_num_threads()
    return max(1, cpus - loader_workers)


class KeyRecorder:
    """Appends each step's sample keys to <run>/keys/rank<r>.jsonl (an audit of what trained when)."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "keys" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, keys: list[str]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def import_from_overrides(overrides: list[str]) -> None:
    """Imports the modules an `imports=[...]` override names, before the config is composed, so that
    the modalities and losses they register are config options (`loss=mine`)."""
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if o.lstrip("+~").startswith("imports=")])
    for override in parsed:
        value = override.value()
        import_modules(value if isinstance(value, list) else [value])
    register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    # The DeepSpeed launcher appends --local_rank=N to the script's arguments; the rank is in the
    # environment (LOCAL_RANK) as well, and Hydra would take the flag for an override.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import_from_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
