"""The schema of `contrastive-train`'s configuration, registered with Hydra's ConfigStore.

`configs/train.yaml` lists `train_schema` first in its defaults, so every YAML file and every
command-line override is checked against these dataclasses: a misspelt key fails at composition with
its full name. Nodes that are instantiated (`optim.optimizer`, `optim.scheduler`) and the per-modality
settings (`modality.<name>`, checked against the modality's own dataclass) are free-form here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from contrastive.optim import NO_DECAY_NAMES


@dataclass
class ModelConfig:
    embed_dim: int = 512
    # <modality>: {init: path, freeze: bool, unlocked_blocks: int, grad_checkpointing: bool, compile: bool}
    towers: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO >= 1; DeepSpeed's CPU Adam)
    config: Optional[str] = None  # a DeepSpeed JSON file applied on top of what the above make


@dataclass
class DataConfig:
    # A dataset directory (.tar shards + sizes.json), a list of them, or [{path: ..., weight: ...}, ...]
    train: Any = MISSING
    eval: Optional[str] = None  # held-out dataset directory for evaluation
    batch_size: int = 64  # per rank
    eval_batch_size: int = 128
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 1000  # samples
    resampled: bool = False  # draw shards with replacement, datasets mixed by weight, virtual epochs
    epoch_samples: int = 0  # resampled: samples per virtual epoch, all ranks (0 = the datasets' total)
    modality_dropout: Dict[str, float] = field(default_factory=dict)  # <modality>: drop probability
    max_bad_fraction: float = 0.05  # stop when more of the samples read so far were bad
    bad_check_after: int = 2000  # samples read before the bad fraction is checked


@dataclass
class TemperatureConfig:
    init: float = 0.07
    learnable: bool = True
    max_logit_scale: float = 100.0


@dataclass
class LossConfig:
    kind: str = "infonce"  # infonce | siglip
    pairs: Any = "all"  # all | anchor:<modality> | [[a, b], ...]
    weights: Dict[str, float] = field(default_factory=dict)  # "<a>-<b>": weight (default 1)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)  # every pair's default
    # "<a>-<b>": that pair's own temperature fields (checked against Temperature when built)
    temperatures: Dict[str, Any] = field(default_factory=dict)
    tile_size: int = 0  # infonce: 0 = plain [local x global] logits; N = tiled in N x N blocks
    bias_init: float = -10.0  # siglip: initial logit bias of every pair
    label_aware: bool = False  # samples with the same json label are no negatives of each other


@dataclass
class OptimConfig:
    optimizer: Any = MISSING  # _target_ + _partial_: called with the parameter groups
    scheduler: Any = None  # _target_ + _partial_: called with (optimizer, total_steps=...)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # names (substrings) of parameters without weight decay, beside every bias and norm
    no_decay: List[str] = field(default_factory=lambda: list(NO_DECAY_NAMES))


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accumulate: int = 1  # batches per step, taken as one batch by the loss (cached features)
    stop_at_step: int = 0  # checkpoint and exit at this step of a longer schedule (0 = run to max_steps)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with dynamic loss scaling) | amp_bf16 (autocast)
    attention: str = "auto"  # SDPA kernels: auto | default | math | flash | efficient | cudnn (contrastive.engine)
    threads: int = 0  # torch intra-op threads per rank; 0: on CPU, cores per rank minus loader workers
    log_every: int = 10
    eval_every: int = 0  # steps; 0 evaluates at the end only
    save_every: int = 0  # steps; 0 saves at the end only
    keep_last: int = 2  # checkpoints kept
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient before the run stops
    progress: bool = True  # progress bar on the main rank
    peak_tflops: float = 0.0  # one device's peak for MFU; 0: datasheet (known GPUs) or measured (CPU)
    record_keys: bool = False  # write the sample keys of every step to <run>/keys/rank<r>.jsonl


@dataclass
class EvalConfig:
    # Zero-shot class prompts; {label} is replaced by each class name found in the eval data.
    prompts: List[str] = field(default_factory=lambda: ["a photo of {label}", "{label}"])
    text_modality: str = "text"
    max_samples: int = 0  # 0 = the whole eval set


@dataclass
class LoggerConfig:
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "contrastive"
    tensorboard: bool = False


@dataclass
class LauncherConfig:
    """Read by contrastive-submit (sbatch options); contrastive-train runs wherever it is started."""

    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"
    job_name: str = "contrastive"
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit
    sbatch: List[str] = field(default_factory=list)  # extra sbatch options
    setup: List[str] = field(default_factory=list)  # shell lines run before srun


@dataclass
class TrainConfig:
    modalities: List[str] = field(default_factory=lambda: ["image", "audio", "text"])
    modality: Dict[str, Any] = field(default_factory=dict)  # <name>: that modality's dataclass fields
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    imports: List[str] = field(default_factory=list)  # modules to import first (your own modalities)
    resume: Optional[str] = None  # latest | a checkpoint directory
    export: bool = True  # write export/ at the end of training


def validate(cfg: Any) -> None:
    """Rejects keys the schema does not know, also those added with Hydra's `+` (which bypasses the
    check at composition); the error names the key."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
