"""The one place the model is wrapped for training: a DeepSpeed engine, configured from explicit
arguments (ZeRO stage, precision, clipping, accumulation, offload) or from a user's own JSON.

DeepSpeed runs the same way on CPU (gloo, its CPU accelerator) and on GPUs (NCCL): the process
group is the one `contrastive.distributed.init_distributed` joined. Our optimizer and schedule (torch
objects built from the Hydra config) are handed to DeepSpeed, which then owns stepping them, mixed
precision, gradient averaging and ZeRO partitioning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from contrastive.accumulate import cached_accumulation
from contrastive.adapters import skip_cpu_shared_memory_allreduce
from contrastive.distributed import collectives_on

log = logging.getLogger("contrastive.engine")

# bf16/fp16: DeepSpeed's mixed precision (weights in 16 bits, fp32 master weights in the optimizer).
# amp_bf16: fp32 weights, the forward under torch.autocast (what open_clip's trainer calls amp_bf16):
# slower, since every op recasts its weights, but norms and the residual stream keep fp32 where
# autocast keeps them.
PRECISIONS = ("fp32", "bf16", "fp16", "amp_bf16")
HALF_PRECISIONS = ("bf16", "fp16", "amp_bf16")  # matmuls in 16 bits
ATTENTION = ("auto", "default", "math", "flash", "efficient", "cudnn")


@dataclass
class EngineConfig:
    """`engine.*`: how DeepSpeed wraps the objective."""

    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO >= 1; DeepSpeed's CPU Adam)
    config: Any = None  # a DeepSpeed JSON file (or dict) applied on top of what the above make


def attention_backends(choice: str, device_type: str, precision: str) -> list | None:
    """The scaled-dot-product-attention kernels training may use (None: PyTorch's own choice).

    auto is PyTorch's choice except for bf16/fp16/amp_bf16 on CPU, where the math kernel (matmuls + softmax)
    is faster: measured on the small benchmark towers (65- and 16-token sequences, 1 thread), the
    CPU flash kernel's bf16 backward took 285 ms of a 1.08 s step, and math cut the step to 0.83 s.
    In fp32 on CPU the flash kernel is the faster one (1.54 vs 1.60 s), and on GPUs it is the point."""
    if choice not in ATTENTION:
        raise ValueError(f"trainer.attention: expected one of {ATTENTION}, got {choice!r}")
    if choice == "auto":
        choice = "math" if device_type == "cpu" and precision != "fp32" else "default"
    if choice == "default":
        return None
    from torch.nn.attention import SDPBackend

    return [
        {
            "math": SDPBackend.MATH,
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }[choice]
    ]


def cuda_kernels(tf32: bool) -> None:
    """What open_clip's trainer sets on GPUs: cuDNN picks the fastest convolution for each shape
    (the patch embeddings, whose shapes never change) and, with `tf32`, fp32 matmuls and convolutions
    run on the tensor cores in TF32 (what an fp32 run computes in; bf16 runs are unaffected)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _quiet_deepspeed(device_type: str) -> None:
    if device_type == "cpu":
        # Without this DeepSpeed picks CUDA whenever a GPU is visible, and moves a CPU run's model there.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("compilers.C.base").setLevel(logging.WARNING)  # DeepSpeed's probe for libaio
    # DeepSpeed 0.19 still calls collectives that torch 2.13 renamed; the old names work.
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning
    )
    skip_cpu_shared_memory_allreduce()  # gloo's all-reduce is what CPU runs use
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def deepspeed_config(
    settings: EngineConfig | None = None,
    *,
    micro_batch_size: int,
    world_size: int,
    precision: str = "fp32",
    grad_clip: float = 0.0,
    accumulate: int = 1,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config for these settings (engine.*, with the trainer's precision, clipping and
    accumulation); `settings.config` (a JSON path or dict) is applied on top."""
    settings = settings or EngineConfig()
    zero_stage, offload_optimizer, user_config = settings.zero_stage, settings.offload_optimizer, settings.config
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision: expected one of {PRECISIONS}, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage: expected 0, 1, 2 or 3, got {zero_stage}")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate,
        "train_batch_size": micro_batch_size * accumulate * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "torch_autocast": {"enabled": precision == "amp_bf16", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device twice a step to time it; our progress
        # line times steps on the host
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        # a resume on another number of ranks loads a universal checkpoint (contrastive.ds_checkpoint)
        "checkpoint": {"load_universal": load_universal},
    }
    if offload_optimizer:
        if zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if user_config:
        extra = (
            json.loads(Path(user_config).read_text())
            if isinstance(user_config, (str, os.PathLike))
            else dict(user_config)
        )
        cfg = _merge(cfg, extra)
    return cfg


@contextmanager
def _no_optimizer_step(optimizer: torch.optim.Optimizer):
    """No optimizer step while DeepSpeed sets up. Its bf16 (stage 0) and fp16 wrappers step the
    optimizer once on zero gradients to create its states: AdamW's step count then starts at 1, so
    every bias correction runs one step late (the first real update was 0.74x the learning rate)
    and the weights decayed once before training. torch optimizers create their states lazily on
    the first real step, and load_state_dict needs none beforehand."""
    own = optimizer.__dict__.get("step")  # an LR scheduler wraps the instance's step to track calls
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own


# A step's verdict, a number on the device (reading it is the loop's business, a step later):
APPLIED, BAD_GRADIENT, BAD_LOSS = 0, 1, 2


def loss_total(logs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The step's logged loss (the sum of the pair losses, all-reduced: the same on every rank)."""
    return sum(v for k, v in logs.items() if k.startswith("loss/"))


def _finite(logs: Mapping[str, torch.Tensor]) -> bool:
    # The logged pair losses are all-reduced: every rank reaches the same verdict.
    return math.isfinite(float(loss_total(logs)))


def verdict(bad_loss: torch.Tensor, bad_gradient: torch.Tensor) -> torch.Tensor:
    """APPLIED, BAD_GRADIENT or BAD_LOSS as a float on the device, from two device booleans."""
    return torch.where(bad_loss, float(BAD_LOSS), torch.where(bad_gradient, float(BAD_GRADIENT), float(APPLIED)))


def skips_on_device(optimizer: Any) -> bool:
    """Whether `optimizer` can skip an update by a device flag (torch's fused Adam/AdamW read
    `found_inf`, as GradScaler sets it): a non-finite step then costs no host round trip."""
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (and the mask dict's tensors) to `device`; the rest as is."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {
                kk: vv.to(device, non_blocking=True) if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()
            }
        else:
            out[k] = v
    return out


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


class Engine:
    """A DeepSpeed engine around the objective (model + loss)."""

    def __init__(
        self,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        config: dict[str, Any],
        attention: str = "auto",
        tf32: bool = True,
    ):
        self.config = config
        self.device = next(objective.parameters()).device
        device = self.device.type
        _quiet_deepspeed(device)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != device:
            raise RuntimeError(
                f"the model is on {device}, but DeepSpeed's accelerator in this process is "
                f"{get_accelerator().device_name()!r} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}): "
                "one process trains on one kind of device"
            )
        precision = (
            "bf16"
            if config["bf16"]["enabled"]
            else "fp16"
            if config["fp16"]["enabled"]
            else "amp_bf16"
            if config.get("torch_autocast", {}).get("enabled")
            else "fp32"
        )
        self._backends = attention_backends(attention, device, precision)
        if device == "cuda":
            cuda_kernels(tf32)
        self.objective = objective
        self._norm: float | None = None
        self.zero_stage = config["zero_optimization"]["stage"]
        if config["zero_optimization"].get("offload_optimizer"):
            # Offloaded optimizer states need DeepSpeed's CPU Adam (JIT-compiled once, ~1 minute).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            group = optimizer.param_groups[0]
            optimizer = DeepSpeedCPUAdam(
                optimizer.param_groups,
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                adamw_mode=True,
            )
            if scheduler is not None:
                scheduler.optimizer = optimizer
        # At stage 0 we clip ourselves (one norm pass, which also decides whether the step is
        # finite); DeepSpeed would take a second pass over the gradients for its own clipping.
        self.grad_clip = config["gradient_clipping"]
        self.own_clipping = self.zero_stage == 0 and not config["fp16"]["enabled"] and not config["bf16"]["enabled"]
        if self.own_clipping:
            config = {**config, "gradient_clipping": 0.0}
        with _no_optimizer_step(optimizer):
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=objective,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=config,
                dist_init_required=False,
            )
        # At stage 0 (but for fp16, whose loss scaler decides) we take the norm ourselves, which also
        # decides whether the step is finite; with torch's fused AdamW the verdict skips the update on
        # the device (`found_inf`), so an ordinary step reads nothing back to the host.
        self.own_norm = self.zero_stage == 0 and not config["fp16"]["enabled"]
        self.device_skip = self.own_clipping and skips_on_device(self.optimizer)
        self._trained = [p for p in objective.parameters() if p.requires_grad]
        if self.engine.dp_world_size == 1 and self.zero_stage == 0 and not collectives_on():
            # One rank: nothing to average, yet DeepSpeed would still flatten every gradient into a
            # bucket and all-reduce it (~10 ms a step for the tiny demo model on CPU). ZeRO's own
            # gradient partitioning runs on that path, so only stage 0 skips it.
            self.engine.enable_backward_allreduce = False

    # -- the training step ---------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def train_step(self, micro_batches: list[Mapping[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over `micro_batches`, which the loss takes as one batch (cached features,
        see contrastive.accumulate). Returns (the loss's metrics, the step's verdict as a number on the
        device: APPLIED, or BAD_LOSS / BAD_GRADIENT for a non-finite step, which changes no weight)."""
        micro = [to_device(batch, self.device) for batch in micro_batches]
        verdicts: list[torch.Tensor] = []
        towers: dict[str, torch.Tensor] = {}
        total: list[torch.Tensor] = []

        def proceed(logs: Mapping[str, torch.Tensor]) -> bool:
            # where the optimizer skips on the device, a non-finite loss is found after backward
            # (its gradient is non-finite too); else the host looks now, before any backward
            total.append(loss_total(logs))
            return self.device_skip or _finite(logs)

        if len(micro) == 1:
            loss, logs = self(micro[0])
            if proceed(logs):
                self.backward(loss)
                towers = self.tower_grad_norms() if self.measure else {}
                verdicts.append(self.step(total[0]))
        else:

            def backward(surrogate: torch.Tensor) -> None:
                self.backward(surrogate)
                # the whole step's gradients exist only at the last micro-batch (under ZeRO they
                # sit in reduce buckets until DeepSpeed's accumulation boundary)
                if self.measure and len(verdicts) == len(micro) - 1:
                    towers.update(self.tower_grad_norms())
                verdicts.append(self.step(total[0]))

            loss, logs = cached_accumulation(
                lambda b: self(b, embed_only=True),
                self.objective.loss,
                micro,
                backward=backward,
                proceed=lambda loss, logs: proceed(logs),
            )
        status = verdicts[-1] if verdicts else torch.full((), float(BAD_LOSS), device=self.device)
        return {**logs, **towers}, status

    @property
    def measure(self) -> bool:
        """Whether this step measures (the loss's telemetry, the towers' gradient norms): logging steps."""
        return bool(getattr(self.objective.loss, "measure", False))

    @measure.setter
    def measure(self, on: bool) -> None:
        if hasattr(self.objective.loss, "measure"):
            self.objective.loss.measure = on

    def tower_grad_norms(self) -> dict[str, torch.Tensor]:
        """`grad_norm/<tower>`: each tower's whole gradient norm, after backward and before the step,
        summed on the device in fp32 (read with the step's other metrics; collective under ZeRO:
        every rank asks; DeepSpeed's safe_get_full_grad gathers partitions)."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, encoder in self.objective.model.encoders.items():
            grads = [safe_get_full_grad(p) if p.requires_grad else None for p in encoder.parameters()]
            norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads if g is not None]
            out[f"grad_norm/{name}"] = (
                torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.device)
            )
        return out

    def _attention(self):
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._backends) if self._backends else nullcontext()

    def __call__(self, batch: Mapping[str, Any], embed_only: bool = False):
        with self._attention():
            return self.engine(batch, embed_only=embed_only)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already the whole step's (cached accumulation): no division by micro-steps.
        # (Under the same kernels: activation checkpointing recomputes forwards here.)
        with self._attention():
            self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, total: torch.Tensor | None = None) -> torch.Tensor:
        """Ends a micro-step (an optimizer step at the accumulation boundary, of a step whose logged
        loss is `total`; None: a finite one). Returns the verdict on the device (APPLIED off the
        boundary)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if not boundary or not self.own_norm:
            # ZeRO 1-3 and fp16 detect overflow themselves (and read it on the host)
            self.engine.step()
            applied = not boundary or self.engine.was_step_applied()
            return torch.full((), float(APPLIED if applied else BAD_GRADIENT), device=self.device)
        # Stage 0 would apply a non-finite step. Gradients are averaged over ranks by now, and the
        # loss is all-reduced, so every rank reaches the same verdict.
        grads = [p.grad for p in self._trained if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        if self.own_clipping and self.grad_clip > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self._trained, self.grad_clip, norm, foreach=True)
        self._norm = norm
        bad_loss = (
            ~torch.isfinite(total) if total is not None else torch.zeros((), dtype=torch.bool, device=norm.device)
        )
        status = verdict(bad_loss, bad_loss | ~torch.isfinite(norm))
        if self.device_skip:
            self.optimizer.found_inf = (status != APPLIED).float()  # the fused update skips itself
        elif bool(status != APPLIED):  # one host read: this optimizer cannot skip on the device
            for p in self.objective.parameters():
                p.grad = None  # a step without gradients changes no weight nor moment
        self.engine.step()
        return status

    def grad_norm(self) -> float:
        """The last optimizer step's global gradient norm (before clipping)."""
        norm = self._norm if self.own_norm and self._norm is not None else self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    @property
    def lr(self) -> float:
        """The schedule's learning rate (a group's, over its tower's scale)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def lrs(self) -> dict[str, float]:
        """Each named group's top learning rate (per tower, with lr_scale or layer_decay set)."""
        out: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            name = group.get("name", "base")
            out[name] = max(out.get(name, 0.0), group["lr"])
        return out if len(out) > 1 else {}
