"""`contrastive-train`: the Hydra application that trains, evaluates, checkpoints and exports.

    contrastive-train experiment=demo
    contrastive-train experiment=demo modalities=[image,text] loss.temperature.learnable=false
    contrastive-train experiment=demo hydra.run.dir=runs/mine resume=latest
    torchrun --nproc_per_node 2 $(which contrastive-train) experiment=demo engine.zero_stage=2
    deepspeed --num_gpus 2 $(which contrastive-train) experiment=demo
    srun --ntasks 8 contrastive-train ...        (see slurm/)

This is the only place that reads the composed config; everything below it takes explicit arguments.
The same code runs under every launcher: rank and world size come from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contrastive.builders import (
    build_dataset,
    build_loss,
    build_modalities,
    build_objective,
    build_optimizer,
    import_modules,
)
from contrastive.checkpoint import load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from contrastive.config import register_configs, validate
from contrastive.data.pipeline import batches
from contrastive.data.shards import DataError
from contrastive.distributed import DistInfo, barrier, init_distributed, same_on_every_rank
from contrastive.engine import Engine, consolidated_state_dict, deepspeed_config
from contrastive.evaluate import compute_metrics, embed_dataset, format_table
from contrastive.export import export_model
from contrastive.flops import peak_flops, training_flops_per_sample
from contrastive.preemption import StopRequest
from contrastive.towers import apply_tower_settings
from contrastive.plots import write_plots
from contrastive.tracking import MetricsLogger, read_metrics
from contrastive.train import TrainState, train_loop

log = logging.getLogger("contrastive")

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
register_configs()


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Trains as `cfg` says, in `run_dir`; returns the final evaluation metrics (empty without eval data)."""
    validate(cfg)
    import_modules(cfg.imports)
    dist = init_distributed(cfg.trainer.device)
    run_dir = same_on_every_rank(run_dir)
    torch.set_num_threads(compute_threads(cfg.trainer.threads, dist, cfg.data.num_workers))
    torch.manual_seed(cfg.trainer.seed)

    modalities = build_modalities(cfg.modalities, plain(cfg.modality))
    # LossConfig's fields are build_loss's keyword arguments: the config mirrors the object.
    loss = build_loss(list(modalities), **plain(cfg.loss))
    objective = build_objective(modalities, embed_dim=cfg.model.embed_dim, loss=loss)
    apply_tower_settings(objective.model, plain(cfg.model.towers))
    objective.to(dist.device)
    optimizer, scheduler = build_optimizer(
        objective,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.scheduler else None,
        total_steps=cfg.trainer.max_steps,
        no_decay=list(cfg.optim.no_decay),
    )
    engine = Engine(objective, optimizer, scheduler, deepspeed_config(
        micro_batch_size=cfg.data.batch_size, world_size=dist.world_size, zero_stage=cfg.engine.zero_stage,
        precision=cfg.trainer.precision, grad_clip=cfg.optim.grad_clip, accumulate=cfg.trainer.accumulate,
        offload_optimizer=cfg.engine.offload_optimizer, user_config=cfg.engine.config,
    ), attention=cfg.trainer.attention)
    data = partial(build_dataset, modalities=modalities, seed=cfg.trainer.seed, num_workers=cfg.data.num_workers,
                   rank=dist.rank, world_size=dist.world_size)
    train_set = data(plain(cfg.data.train), batch_size=cfg.data.batch_size, train=True,
                     shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                     epoch_samples=cfg.data.epoch_samples, modality_dropout=plain(cfg.data.modality_dropout))
    eval_set = data(cfg.data.eval, batch_size=cfg.data.eval_batch_size, train=False) if cfg.data.eval else None

    state = TrainState()
    checkpoint = resolve_resume(cfg.resume, run_dir)
    if checkpoint is not None:
        meta, mine = load_checkpoint(checkpoint, engine)
        if meta["data_layout"] != train_set.layout():
            raise DataError(
                f"resume: the checkpoint's data position is for {meta['data_layout']}, this run has "
                f"{train_set.layout()}; exact resume needs the same ranks, workers and batch size")
        state = TrainState.from_dict(meta["state"])
        set_rng_state(mine["rng"])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.step,
                 state.position.epoch, state.position.batch)

    config = OmegaConf.to_container(cfg, resolve=True)
    if dist.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    logger = MetricsLogger(run_dir, enabled=dist.is_main, wandb_mode=cfg.logger.wandb, project=cfg.logger.project,
                           tensorboard=cfg.logger.tensorboard, config=config)

    def evaluate(step: int) -> dict[str, float]:
        embedded = embed_dataset(objective.model, eval_set, device=dist.device, max_samples=cfg.eval.max_samples)
        metrics = compute_metrics(objective.model, embedded, prompts=list(cfg.eval.prompts),
                                  text_modality=cfg.eval.text_modality)
        out = {f"eval/{k}": v for k, v in metrics.items()}
        if dist.is_main:
            log.info("evaluation at step %d on %s\n%s", step, cfg.data.eval, format_table(metrics))
            write_plots(run_dir, read_metrics(run_dir) + [{"step": step, **out}], embedded)
        return out

    def save(state: TrainState) -> Path:
        return save_checkpoint(run_dir, state.step, engine, keep_last=cfg.trainer.keep_last, rank_state={"rng": rng_state()},
                               meta={
                                   "state": state.to_dict(),
                                   # each stream's position follows from (epoch, batch) and the layout;
                                   # written out so a reader sees where every rank and worker stands
                                   "data_layout": train_set.layout(),
                                   "data_streams": {r: train_set.stream_position(state.position.batch)
                                                    for r in range(dist.world_size)},
                                   "config": config,
                               })

    tower_flops = training_flops_per_sample(objective.model)
    peak, peak_source = peak_flops(dist.device, cfg.trainer.precision, cfg.trainer.peak_tflops)
    if dist.is_main:
        log.info("training FLOPs per sample: %s (%.3g GFLOP); peak %.3g TFLOP/s per device (%s)",
                 ", ".join(f"{k} {v / 1e9:.3g} GFLOP" for k, v in tower_flops.items()),
                 sum(tower_flops.values()) / 1e9, peak / 1e12, peak_source)
    stop = StopRequest()
    state = train_loop(
        engine=engine,
        loss_fn=objective.loss,
        batches=batches(train_set, state.position, pin_memory=dist.device.type == "cuda"),
        state=state,
        max_steps=cfg.trainer.max_steps,
        stop_at_step=cfg.trainer.stop_at_step,
        device=dist.device,
        log_every=cfg.trainer.log_every,
        eval_every=cfg.trainer.eval_every,
        save_every=cfg.trainer.save_every,
        evaluate=evaluate if eval_set is not None else None,
        save=save,
        logger=logger,
        progress=cfg.trainer.progress,
        accumulate=cfg.trainer.accumulate,
        max_bad_steps=cfg.trainer.max_bad_steps,
        max_bad_fraction=cfg.data.max_bad_fraction,
        bad_check_after=cfg.data.bad_check_after,
        record_keys=KeyRecorder(run_dir, dist.rank) if cfg.trainer.record_keys else None,
        stop_requested=stop.requested,
        flops_per_sample=sum(tower_flops.values()),
        peak_flops=peak,
    )
    final = save(state)
    if state.step < cfg.trainer.max_steps:
        why = f"signal {stop.signal}" if stop.signal else "trainer.stop_at_step"
        log.info("stopped at step %d of %d (%s), checkpoint %s; resume=latest continues from it", state.step,
                 cfg.trainer.max_steps, why, final)
        logger.close()
        stop.requeue_if_slurm()
        return {}
    metrics = evaluate(state.step) if eval_set is not None else {}
    logger.log(state.step, metrics)
    logger.close()
    if dist.is_main and eval_set is None:
        write_plots(run_dir, read_metrics(run_dir))
    if dist.is_main:
        _report(cfg, run_dir, objective, final, state, metrics, dist)
    barrier()
    return metrics


def compute_threads(requested: int, dist: DistInfo, loader_workers: int) -> int:
    """torch's intra-op threads for this rank: as asked, or (0) on CPU the rank's share of the cores
    minus its loader workers, which need cores of their own (2 cores: 1.6x the samples/s of torch's
    default, which oversubscribes them)."""
    if requested:
        return requested
    if dist.device.type != "cpu":
        return torch.get_num_threads()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    return max(1, (os.cpu_count() or 1) // max(local_ranks, 1) - loader_workers)


class KeyRecorder:
    """Appends each step's sample keys to <run>/keys/rank<r>.jsonl (an audit of what trained when)."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "keys" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, keys: list[str]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def _report(cfg: DictConfig, run_dir: Path, objective: Any, checkpoint: Path, state: TrainState,
            metrics: dict[str, float], dist: DistInfo) -> None:
    bad = {k: v for k, v in state.counts.items() if k.startswith("bad/")}
    log.info("data: %d samples trained on; bad input skipped and counted: %s; steps skipped for non-finite "
             "values: %d", state.counts.get("samples", 0), bad or "none", state.skipped_steps)
    if cfg.export:
        # From the checkpoint, not the live module: ZeRO partitions and mixed-precision master
        # weights are gathered into one fp32 state dict.
        weights = consolidated_state_dict(checkpoint)
        model = objective.model
        model_state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
        scales = {k.removeprefix("loss.logit_scale."): float(v.exp().clamp(max=objective.loss.temperatures[
            k.removeprefix("loss.logit_scale.")].max_logit_scale)) for k, v in weights.items()
            if k.startswith("loss.logit_scale.")}
        out = export_model(
            model, run_dir / "export", state_dict=model_state, logit_scales=scales,
            metrics={k.removeprefix("eval/"): v for k, v in metrics.items()},
            info={"steps": state.step, "train_data": plain(cfg.data.train), "eval_data": cfg.data.eval,
                  "global_batch_size": cfg.data.batch_size * dist.world_size * cfg.trainer.accumulate,
                  "epochs_seen": state.position.epoch, "samples_seen": state.counts.get("samples", 0),
                  "zero_stage": cfg.engine.zero_stage, "precision": cfg.trainer.precision},
            prompts=list(cfg.eval.prompts),
        )
        log.info("exported to %s", out)
    log.info("run directory: %s", run_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    # The DeepSpeed launcher appends --local_rank=N to the script's arguments; the rank is in the
    # environment (LOCAL_RANK) as well, and Hydra would take the flag for an override.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()


if __name__ == "__main__":
    main()
