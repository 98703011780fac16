"""FLOPs per sample of the towers and the hardware's peak, for the model FLOPs utilisation (MFU)
the trainer reports.

FLOPs are counted, not estimated by formula: torch's FlopCounterMode runs one sample forward and
backward through a copy of every tower built on the meta device (no memory, no compute), so any
modality's tower is counted the same way. The peak is the datasheet's dense figure for known GPUs
(bf16/fp16 tensor cores; TF32 for fp32), `trainer.peak_tflops` when given, or on CPU a measured
matrix-multiply throughput in the precision the matmuls run in (fp32's where bf16 is slower).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from contrastive.engine import HALF_PRECISIONS
from contrastive.model import ContrastiveModel

log = logging.getLogger(__name__)

# Dense tensor-core TFLOP/s: (bf16/fp16, tf32)
GPU_PEAKS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
}


def training_flops_per_sample(model: ContrastiveModel, *, unmasked: bool = False) -> dict[str, float]:
    """Forward + backward FLOPs of one sample through each tower, as training computes them: with
    patch dropout, over the tokens kept (`unmasked`: all of them, as after trainer.unmasked_steps)."""
    from torch.utils.flop_counter import FlopCounterMode

    from contrastive.towers import unmask

    with torch.device("meta"):
        meta = ContrastiveModel(model.modalities, model.embed_dim)
    if unmasked:
        unmask(meta)
    out = {}
    for name, modality in model.modalities.items():
        x = modality.empty()[None].to("meta")
        with FlopCounterMode(display=False) as counter:
            meta.encode(name, x).sum().backward()
        out[name] = float(counter.get_total_flops())
    return out


def measured_cpu_peak(
    seconds: float = 0.3, n: int = 1024, dtype: torch.dtype = torch.float32, trials: int = 5
) -> float:
    """FLOP/s of a matrix multiply in `dtype` with this process's threads (the practical CPU peak): the
    best of `trials` short trials, so that a moment of load elsewhere lowers it less. Still a
    measurement: a CPU busy with other work for all of them gives a peak the run can exceed."""
    while True:  # a size of which a trial holds at least one product: emulated bf16 (a CPU without
        # bf16 instructions) takes ~1 s for one product at 1024, against ~20 ms for fp32
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        start = time.perf_counter()
        a @ b
        if n <= 128 or time.perf_counter() - start <= seconds / trials:
            break
        n //= 2
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / trials:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(FLOP/s of one device, where the figure comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAKS.items():
            if key in name:
                return (half if precision in HALF_PRECISIONS else tf32) * 1e12, f"{name} datasheet"
        return 0.0, f"unknown GPU {name}: set trainer.peak_tflops"
    if precision not in HALF_PRECISIONS:
        return measured_cpu_peak(), "measured CPU fp32 matmul"
    # bf16 matmuls run 2-3x faster than fp32 on CPUs with bf16 instructions (avx512_bf16, AMX) and
    # several times slower on those without (emulated); fp16 is counted as bf16
    half, full = measured_cpu_peak(dtype=torch.bfloat16), measured_cpu_peak()
    if half >= full:
        return half, f"measured CPU bf16 matmul, {half / full:.2g}x fp32's"
    log.warning(
        "trainer.precision=%s: on this CPU (%s) bf16 matmuls run at %.2gx the speed of fp32 ones "
        "(%.3g against %.3g GFLOP/s), so trainer.precision=fp32 trains faster here",
        precision,
        cpu_name(),
        half / full,
        half / 1e9,
        full / 1e9,
    )
    # the MFU is against what this CPU can do: fp32's figure
    return full, f"measured CPU fp32 matmul; bf16 ran at {half / full:.2g}x that"


def cpu_name() -> str:
    """The CPU's model name and the vector instructions that decide matmul speed (Linux; else the platform)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    first_cpu = info.split("\n\n", 1)[0]
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)}
    model, flags = fields.get("model name", ""), fields.get("flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model or platform.machine()} ({', '.join(isa) or 'no avx2'})"
