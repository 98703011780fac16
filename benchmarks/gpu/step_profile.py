"""Where a training step's time goes on the GPU: our DeepSpeed engine against a bare open_clip-style
loop (fp32 weights, autocast bf16, fused AdamW, one backward) over the very same towers and batch,
with no loader in the way, and a profile of the engine's step.

    python benchmarks/gpu/step_profile.py --out OUT/profile.json            (the lent GPU; check.sh)
    python benchmarks/gpu/step_profile.py --out /tmp/profile.json --dry-run  (CPU, tiny towers)

Each variant builds the objective afresh from the same seed (as contrastive-train builds it: Hydra
composition, open_clip's ViT-B-16 towers), takes the same CPU batch each step (copied to the device
as training copies it), and is timed per phase (batch copy, forward, backward, optimizer step) with a
device synchronisation between phases; then one variant runs under torch.profiler and its top
kernels are written beside the timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import composed, tower_overrides  # noqa: E402

FULL = dict(device="cuda", model="base", open_clip_name="ViT-B-16", image=224, text=77, batch=512, steps=6, warmup=3)
DRY = dict(device="cpu", model="tiny", open_clip_name=None, image=32, text=16, batch=8, steps=2, warmup=1)


def objective_and_batch(s: dict, seed: int = 0):
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
    return objective.to(s["device"]), batch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_variant(s: dict, precision: str, zero_stage: int = 0):
    from contrastive.engine import Engine, EngineConfig, deepspeed_config, to_device

    objective, batch = objective_and_batch(s)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4, weight_decay=0.1, fused=s["device"] == "cuda")
    cfg = deepspeed_config(
        EngineConfig(zero_stage=zero_stage), micro_batch_size=s["batch"], world_size=1, precision=precision
    )
    engine = Engine(objective, opt, None, cfg)
    engine.train()

    def phases():
        t = [time.perf_counter()]
        b = to_device(batch, engine.device)
        sync(s["device"])
        t.append(time.perf_counter())
        loss, logs = engine(b)
        sync(s["device"])
        t.append(time.perf_counter())
        engine.backward(loss)
        sync(s["device"])
        t.append(time.perf_counter())
        engine.step()
        float(loss.detach())
        sync(s["device"])
        t.append(time.perf_counter())
        return t

    return phases, engine


def bare_variant(s: dict):
    """open_clip's trainer's step: fp32 weights, autocast bf16, fused AdamW, clip, pinned batch."""
    from contrastive.engine import cuda_kernels

    objective, batch = objective_and_batch(s)
    dev = torch.device(s["device"])
    if dev.type == "cuda":
        cuda_kernels(tf32=True)  # as open_clip_train.main sets them
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4, weight_decay=0.1, fused=dev.type == "cuda")
    pinned = {k: (v.pin_memory() if dev.type == "cuda" and torch.is_tensor(v) else v) for k, v in batch.items()}
    objective.train()

    def phases():
        t = [time.perf_counter()]
        b = {
            k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else {m: x.to(dev) for m, x in v.items()}
            for k, v in pinned.items()
        }
        sync(s["device"])
        t.append(time.perf_counter())
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, logs = objective(b)
        sync(s["device"])
        t.append(time.perf_counter())
        loss.backward()
        sync(s["device"])
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        sync(s["device"])
        t.append(time.perf_counter())
        return t

    return phases, objective


def timed(s: dict, phases) -> dict:
    for _ in range(s["warmup"]):
        phases()
    rows = [phases() for _ in range(s["steps"])]
    names = ("copy", "forward", "backward", "step")
    out = {f"{n}_ms": median(1e3 * (r[i + 1] - r[i]) for r in rows) for i, n in enumerate(names)}
    total = median(r[-1] - r[0] for r in rows)
    out.update(step_ms=1e3 * total, samples_per_s=s["batch"] / total)
    if s["device"] == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def profiled(s: dict, phases, top: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s["device"] == "cuda" else [])
    phases()
    with profile(activities=acts) as prof:
        for _ in range(2):
            phases()
    key = "self_device_time_total" if s["device"] == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    rows = [
        {"name": e.key[:90], "calls": e.count, "ms": getattr(e, key, 0) / 2e3, "share": getattr(e, key, 0) / total}
        for e in events[:top]
    ]
    return {"device_ms_per_step": total / 2e3, "top": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    s = DRY if args.dry_run else FULL
    from contrastive.distributed import init_distributed

    init_distributed(s["device"])  # a group of one, as contrastive-train joins it
    result: dict = {"settings": s}
    variants = [
        ("bare_amp_bf16", lambda: bare_variant(s)),
        ("engine_bf16", lambda: engine_variant(s, "bf16")),
        ("engine_amp_bf16", lambda: engine_variant(s, "amp_bf16")),
    ]
    for name, make in variants:
        t0 = time.time()
        try:
            if s["device"] == "cuda":
                torch.cuda.reset_peak_memory_stats()
            phases, keep = make()
            result[name] = timed(s, phases)
            if name in ("engine_bf16", "bare_amp_bf16"):
                result[name]["profile"] = profiled(s, phases)
            del phases, keep
        except Exception as e:  # noqa: BLE001 - recorded; the next variant runs
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name]["seconds"] = round(time.time() - t0, 1)
        if s["device"] == "cuda":
            torch.cuda.empty_cache()
        shown = {k: v for k, v in result[name].items() if k != "profile"}
        print(f"== {name}: {json.dumps(shown)}", flush=True)
        for row in result[name].get("profile", {}).get("top", [])[:15]:
            print(f"   {row['ms']:8.2f} ms {row['share']:6.1%} x{row['calls']:<5} {row['name']}", flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(1 if any("error" in result[name] for name, _ in variants) else 0)


if __name__ == "__main__":
    main()
