"""The schema of `contrastive-train`'s configuration, registered with Hydra's ConfigStore.

Each part of the config is the settings dataclass of the object it configures, defined beside that
object (`TrainerConfig` in train.py, `DataConfig` in data/settings.py, a loss's settings in its own
file, a modality's fields in its class...). Those dataclasses hold every default; the YAML files in
`configs/` hold only what differs from them. `configs/train.yaml` lists `train_schema`
first in its defaults, so every YAML file and every command-line override is checked against these
types: a misspelt key fails at composition with its full name. Registered modalities and losses are
config group options (`modality/image`, `loss=siglip`): their dataclasses are their configs.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from contrastive import layout
from contrastive.credentials import find_secrets, redact, secret_message
from contrastive.data.settings import DataConfig
from contrastive.distill import DistillSettings
from contrastive.engine import EngineConfig
from contrastive.errors import ConfigError
from contrastive.evaluation.settings import EvalConfig
from contrastive.launch import LauncherConfig
from contrastive.loss import LOSSES, LossSettings
from contrastive.modalities.base import MODALITIES
from contrastive.model import ModelConfig
from contrastive.optim import OptimConfig
from contrastive.tracking import LoggerConfig
from contrastive.train import TrainerConfig

# The shipped YAML configs: configs/ in a checkout, package data in a wheel (contrastive.layout).
CONFIG_DIR = str(layout.CONFIG_DIR)


@dataclass
class TrainConfig:
    modalities: List[str] = field(default_factory=lambda: ["image", "audio", "text"])
    # <name>: that modality's fields (its registered dataclass; `+modality.<name>.<field>=` for your own)
    modality: Dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossSettings = MISSING  # a registered loss's settings: loss=infonce | siglip | yours
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    imports: List[str] = field(default_factory=list)  # modules to import first (your modalities, losses)
    resume: Optional[str] = None  # latest | a checkpoint directory
    export: bool = True  # write export/ at the end of training
    distill: DistillSettings = field(default_factory=DistillSettings)  # a frozen teacher (contrastive.distill)


def validate(cfg: Any) -> None:
    """Rejects keys that no settings dataclass holds, also those added with Hydra's `+` (which opens
    the config for the addition); the error names the key and what its node takes."""

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, DictConfig):
            return
        kind = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(kind):
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = [k for k in node.keys() if k not in known]
            if unknown:
                raise ConfigError(
                    f"{path}{unknown[0]}: no such key; {path.rstrip('.') or 'the config'} "
                    f"({kind.__name__}) takes {sorted(known)}"
                )
        for key in node.keys():
            if key != "hydra" and not OmegaConf.is_interpolation(node, key):
                walk(node[key], f"{path}{key}.")

    walk(cfg, "")


def as_schema(cfg: Any) -> DictConfig:
    """The config typed by its schema. Hydra's composition already is; a config read back from a file
    (a SLURM job's job_config.yaml) is plain and is typed here: its loss by the loss's name, each
    registered modality by its class. A key no schema holds fails with its name."""
    if OmegaConf.get_type(cfg) is TrainConfig:
        return cfg
    data = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    data.pop("hydra", None)
    schema = OmegaConf.structured(TrainConfig)
    name = (data.get("loss") or {}).get("name") or "infonce"
    if name not in LOSSES:
        raise ConfigError(f"loss.name: unknown loss {name!r}; registered: {sorted(LOSSES)}")
    schema.loss = OmegaConf.structured(LOSSES[name].settings)
    for modality in data.get("modality") or {}:
        if modality in MODALITIES:
            schema.modality[modality] = OmegaConf.structured(MODALITIES[modality])
    try:
        return OmegaConf.merge(schema, data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key}: {e.msg}") from None


# Free-form dicts a user fills with keys of their own: assigned whole from the command line, with or
# without `+` (`data.storage_options={s3: {endpoint_url: ...}}`), as the README writes them.
OPEN_DICTS = ("data.storage_options", "data.modality_dropout", "trainer.ema")


def register_configs() -> None:
    """The schema, and every registered modality and loss as an option of its config group. Called
    again after importing a user's module, so that what it registers can be chosen."""
    store = ConfigStore.instance()
    schema = OmegaConf.structured(TrainConfig)
    for path in OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(schema, path), False)
    store.store(name="train_schema", node=schema)
    for name, cls in MODALITIES.items():
        store.store(group="modality", name=name, node=cls)
    for name, cls in LOSSES.items():
        store.store(group="loss", name=name, node=cls.settings(name=name))


def override_credentials(overrides: list[str]) -> list[tuple[str, str]]:
    """(key path, why) of each credential in command-line overrides, sweeps' values included."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return []
    found = []
    for override in parsed:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            found += find_secrets({override.key_or_group: value})
    return found


def refuse_credentials(cfg: Any) -> None:
    """Raises ConfigError naming the key path of each credential in a config (its interpolations
    unresolved: `${oc.env:...}` is allowed) and, for Hydra's full config, in its overrides."""
    plain = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    hydra = plain.pop("hydra", None) or {}
    found = list(find_secrets(plain))
    found += override_credentials(((hydra.get("overrides") or {}).get("task")) or [])
    if found:
        raise ConfigError(secret_message(list(dict.fromkeys(found))))


def saved_config(cfg: Any) -> dict[str, Any]:
    """The config as every copy of it is written (config.yaml, checkpoints, wandb, exports): resolved,
    with every credential (one an `${oc.env:...}` brought in) redacted."""
    return redact(OmegaConf.to_container(cfg, resolve=True))


class RefuseCredentials(Callback):
    """Hydra calls this before it writes anything of a run (its .hydra/ copies of the config and the
    overrides, the run directory): a credential in the config stops the run there, named. Hydra turns
    a callback's exceptions into warnings and carries on, so this one exits (status 2) instead."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config)

    @staticmethod
    def _refuse(config: DictConfig) -> None:
        try:
            refuse_credentials(config)
        except ConfigError as e:
            print(f"contrastive-train: {e}", file=sys.stderr)
            raise SystemExit(2) from None
