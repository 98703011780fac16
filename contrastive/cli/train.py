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

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from contrastive.builders import import_modules
from contrastive.config import CONFIG_DIR, as_schema, refuse_credentials, register_configs, saved_config, validate
from contrastive.credentials import environment_secrets, seal_logs
from contrastive.training import RunSpec, train_run

log = logging.getLogger("contrastive")


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def typed(node: Any) -> Any:
    """A config node as the settings object its schema names (TrainerConfig, a loss's settings...)."""
    return OmegaConf.to_object(node)


def run_spec(cfg: DictConfig) -> RunSpec:
    """The composed config, checked (credentials, unknown keys), as the typed settings a run takes."""
    import_modules(cfg.imports)
    refuse_credentials(cfg)
    cfg = as_schema(cfg)
    validate(cfg)
    return RunSpec(
        modalities=list(cfg.modalities),
        modality=plain(cfg.modality),
        model=typed(cfg.model),
        loss=typed(cfg.loss),
        data=typed(cfg.data),
        trainer=typed(cfg.trainer),
        engine=typed(cfg.engine),
        eval=typed(cfg.eval),
        optim=typed(cfg.optim),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.scheduler else None,
        logger=typed(cfg.logger),
        resume=cfg.resume,
        export=cfg.export,
        config=saved_config(cfg),  # every credential redacted, also one the environment brought in
        distill=typed(cfg.distill),
    )


def run(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Trains as `cfg` says, in `run_dir` (contrastive.training); returns the final evaluation metrics.
    No log line shows a value the config brought in from the environment (contrastive.credentials)."""
    seal_logs(environment_secrets(OmegaConf.to_container(cfg, resolve=False)))
    return train_run(run_spec(cfg), run_dir)


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
