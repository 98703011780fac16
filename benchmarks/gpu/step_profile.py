"""Where a training step's time goes, row by row, at the GPU benchmark's batch: our engine as users run
it, the same with measuring on every step, each engine path for 16-bit training, torch.compile, and
open_clip's own step (a bare autocast loop) over the very same towers and batch. No loader is in the
way: every row copies the same pinned batch to the device as training's loader hands it over.

    python benchmarks/gpu/step_profile.py --out OUT/profile.json            (the lent GPU; check.sh)
    python benchmarks/gpu/step_profile.py --out /tmp/profile.json --dry-run  (CPU, tiny towers)

Per row: the median step time over steps run back to back (no synchronisation inside a step, as
training runs them), and from a profile of two steps the device's busy and idle time per step (busy:
the union of its kernels' intervals), the kernels launched per step, the host reads of tensor values
per step (contrastive.syncs) and, on CUDA, the synchronising calls torch reports (its sync debug mode).

Rows:
  ours            contrastive's engine step as training runs it: amp_bf16 (fp32 weights, autocast),
                  fused AdamW that skips a non-finite step on the device, the step's agreed flags
  ours_measuring  the same with measuring on every step (trainer.measure_every=1): telemetry's cost
  bf16_zero0      DeepSpeed bf16 weights at ZeRO-0 (its unfused fp16/bf16 optimizer wrapper)
  bf16_zero1      DeepSpeed bf16 weights at ZeRO-1 (its BF16_Optimizer)
  compile         `ours` with every tower compiled (trainer.compile=true)
  open_clip       open_clip_train's step: autocast bf16, fused AdamW, clip, one backward
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import composed, tower_overrides  # noqa: E402

FULL = dict(device="cuda", model="base", open_clip_name="ViT-B-16", image=224, text=77, batch=1024, steps=8, warmup=3)
DRY = dict(device="cpu", model="tiny", open_clip_name=None, image=32, text=16, batch=8, steps=3, warmup=1)


def objective_and_batch(s: dict, seed: int = 0):
    """The image-text objective as contrastive-train builds it, and one pinned batch."""
    from omegaconf import OmegaConf

    from contrastive.builders import build_loss, build_objective
    from contrastive.towers import apply_tower_settings

    cfg, mods = composed(["image", "text"], f"model={s['model']}", *tower_overrides(s))
    torch.manual_seed(seed)
    objective = build_objective(
        mods, embed_dim=cfg.model.embed_dim, loss=build_loss(list(mods), OmegaConf.to_object(cfg.loss))
    )
    apply_tower_settings(objective.model, OmegaConf.to_object(cfg.model).towers)
    g = torch.Generator().manual_seed(1)
    n = s["batch"]
    text = torch.randint(1, 4000, (n, s["text"]), generator=g)
    text[:, -1] = 49407  # open_clip's end-of-text token, which its text tower pools at
    batch = {
        "image": torch.randn(n, 3, s["image"], s["image"], generator=g),
        "text": text,
        "mask": {"image": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool)},
    }
    if s["device"] == "cuda":  # the loader's pin_memory
        batch = {
            k: v.pin_memory() if torch.is_tensor(v) else {m: x.pin_memory() for m, x in v.items()}
            for k, v in batch.items()
        }
    return objective.to(s["device"]), batch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_row(s: dict, precision: str, zero_stage: int = 0, *, measuring: bool = False, compiled: bool = False):
    """A step of our engine (Engine.train_step) and the loop's agreed flags, as contrastive-train runs it."""
    from contrastive.distributed import AgreedFlags
    from contrastive.engine import Engine, EngineConfig, deepspeed_config
    from contrastive.towers import apply_tower_settings

    objective, batch = objective_and_batch(s)
    if compiled:
        apply_tower_settings(objective.model, {name: {"compile": True} for name in objective.model.encoders})
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    cfg = deepspeed_config(
        EngineConfig(zero_stage=zero_stage), micro_batch_size=s["batch"], world_size=1, precision=precision
    )
    engine = Engine(objective, opt, None, cfg)
    engine.train()
    engine.measure = measuring
    flags = AgreedFlags()

    def step():
        _, status = engine.train_step([batch])
        flags.collect()  # the step before's, as the loop reads them
        flags.post(torch.stack([status.float(), torch.zeros((), device=status.device)]))

    return step, engine


def open_clip_row(s: dict):
    """open_clip_train's step: fp32 weights, autocast bf16, fused AdamW, clip at 1.0."""
    from contrastive.engine import cuda_kernels

    objective, batch = objective_and_batch(s)
    dev = torch.device(s["device"])
    if dev.type == "cuda":
        cuda_kernels(tf32=True)  # as open_clip_train.main sets them
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    objective.train()

    def step():
        b = {
            k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else {m: x.to(dev) for m, x in v.items()}
            for k, v in batch.items()
        }
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, logs = objective(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, objective


def timed(s: dict, step) -> dict:
    """The median of back-to-back steps (a synchronisation after each, none inside)."""
    for _ in range(s["warmup"]):
        step()
    sync(s["device"])
    times = []
    for _ in range(s["steps"]):
        t0 = time.perf_counter()
        step()
        sync(s["device"])
        times.append(time.perf_counter() - t0)
    out = {"step_ms": 1e3 * median(times), "samples_per_s": s["batch"] / median(times)}
    if s["device"] == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals, in their unit / 1e3."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def counted(s: dict, step, steps: int = 2) -> dict:
    """Per step, from `steps` profiled steps: device busy/idle ms, kernels, host reads, CUDA syncs."""
    from torch.profiler import ProfilerActivity, profile

    from contrastive.syncs import HostReads

    cuda = s["device"] == "cuda"
    step()
    sync(s["device"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostReads() as reads:
                for _ in range(steps):
                    step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    sync(s["device"])
    out = {
        "host_reads_per_step": reads.count / steps,
        "host_reads_by_kind": {k: v / steps for k, v in reads.by_kind.items()},
    }
    if cuda:
        out["cuda_syncs_per_step"] = sum("synchronizing" in str(w.message) for w in caught) / steps
        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(s["device"])
            wall = (time.perf_counter() - t0) * 1e3 / steps
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = busy_ms([(e.time_range.start, e.time_range.end) for e in kernels]) / steps
        top: dict = {}
        for e in kernels:
            top[e.name[:80]] = top.get(e.name[:80], 0.0) + e.device_time_total / 1e3 / steps
        out.update(
            profiled_step_ms=wall,
            gpu_busy_ms=busy,
            gpu_idle_ms=max(wall - busy, 0.0),
            kernels_per_step=len(kernels) / steps,
            top_kernels_ms=dict(sorted(top.items(), key=lambda kv: -kv[1])[:12]),
        )
    return out


ROWS = {
    "ours": lambda s: engine_row(s, "amp_bf16"),
    "ours_measuring": lambda s: engine_row(s, "amp_bf16", measuring=True),
    "bf16_zero0": lambda s: engine_row(s, "bf16", 0),
    "bf16_zero1": lambda s: engine_row(s, "bf16", 1),
    "compile": lambda s: engine_row(s, "amp_bf16", compiled=True),
    "open_clip": open_clip_row,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    s = DRY if args.dry_run else FULL
    from contrastive.distributed import init_distributed

    init_distributed(s["device"])  # a group of one, as contrastive-train joins it
    result: dict = {"settings": s}
    for name in args.rows:
        if args.dry_run and name == "compile":
            result[name] = {"skipped": "compiling on the CPU takes minutes (inductor); rows are timed on the GPU"}
            print(f"== {name}: skipped in the dry run", flush=True)
            continue
        t0 = time.time()
        try:
            if s["device"] == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step, keep = ROWS[name](s)
            result[name] = {**timed(s, step), **counted(s, step)}
            del step, keep
        except Exception as e:  # noqa: BLE001 - recorded; the next row runs
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name]["seconds"] = round(time.time() - t0, 1)
        if s["device"] == "cuda":
            torch.cuda.empty_cache()
        shown = {k: v for k, v in result[name].items() if k not in ("top_kernels_ms", "host_reads_by_kind")}
        print(f"== {name}: {json.dumps(shown)}", flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    base = result.get("open_clip", {}).get("step_ms")
    for name in args.rows:
        if base and "step_ms" in result.get(name, {}):
            result[name]["over_open_clip"] = base / result[name]["step_ms"]
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(1 if any("error" in result[name] for name in args.rows) else 0)


if __name__ == "__main__":
    main()
