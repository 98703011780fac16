"""The GPU check's measurements, each against open_clip's own trainer or a reference in the same run
(run by check.sh; --dry-run runs the same stages on the CPU at tiny sizes so that they keep working).

    python benchmarks/gpu/measure.py --out OUT/gpu.json --open-clip-site /tmp/site-openclip [--dry-run]

Stages, each printed as it goes and written to the JSON at once (a stage that fails records its error
and the next one runs; one that would start past the time budget is skipped and says so):
  env          the device, torch and CUDA versions
  peak         the measured bf16 matmul rate (the MFU's denominator)
  shards       synthetic image-text and image-audio-text shards (224 px JPEG, 2 s FLAC, captions)
  image_text   contrastive-train in its default configuration (log and measuring steps at their
               defaults), ViT-B/16 towers (open_clip's config), amp_bf16, the largest batch of the
               candidates that fits: samples/s, MFU, data wait, peak memory; timed over whole logging
               windows, the first (warm-up) and the last (the end's measuring step) left out
  open_clip    open_clip's trainer (open_clip_train.main), the same model, shards, batch and workers,
               amp_bf16: samples/s, and the MFU of the same FLOPs
  trimodal     contrastive-train, the base image-audio-text model: samples/s, MFU
  loader       our pipeline alone with 8 and 14 workers, against the image-text run's demand
  loss         tiled and plain InfoNCE and open_clip's ClipLoss at global batch 64k: memory, time
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

from synthetic import shards_stage  # this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FULL = dict(
    device="cuda",
    precision="amp_bf16",
    open_clip_precision="amp_bf16",
    model="base",
    open_clip_name="ViT-B-16",
    image_size=224,
    audio_seconds=2.0,
    samples=8192,
    batches=[1024, 768, 512, 256],
    steps=40,
    log_every=10,
    warmup=10,
    workers=14,
    loader_workers=[8, 14],
    loader_batches=40,
    loss_n=65536,
    loss_dim=512,
    matmul=8192,
)
DRY = dict(
    device="cpu",
    precision="fp32",
    open_clip_precision="fp32",
    model="tiny",
    open_clip_name=None,
    image_size=32,
    audio_seconds=1.0,
    samples=96,
    batches=[16],
    steps=6,
    log_every=2,
    warmup=2,
    workers=1,
    loader_workers=[1, 2],
    loader_batches=4,
    loss_n=4096,
    loss_dim=64,
    matmul=256,
)
GOALS = {"image_text_mfu": 0.40, "image_text_over_open_clip": 1.3}
TINY_OPEN_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2},
}


def env_stage(s: dict) -> dict:
    import torch

    out = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    return out


def peak_stage(s: dict) -> dict:
    """bf16 matrix products of n x n x n, ten after three warm-ups, on random data."""
    import torch

    n, dev = s["matmul"], torch.device(s["device"])
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    seconds = (time.perf_counter() - t0) / 10
    return {"n": n, "bf16_tflops": 2 * n**3 / seconds / 1e12}


def _metrics(run_dir: Path) -> dict:
    """The logging windows' figures, but the first (warm-up) and the last (the end's measuring step)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "samples_per_s" in r][1:-1]
    if not steps:
        raise RuntimeError(f"no logging window between the first and the last in {run_dir}/metrics.jsonl")
    seconds = [1 / r["samples_per_s"] for r in steps]  # per sample, each row a window of log_every steps
    out = {
        "samples_per_s": 1 / mean(seconds),
        "mfu": mean(r["mfu"] for r in steps),
        "data_wait_frac": mean(r["data_wait_frac"] for r in steps),
        "steps_timed": len(steps),
    }
    memory = [r["gpu_peak_memory_gb"] for r in steps if "gpu_peak_memory_gb" in r]
    if memory:
        out["peak_memory_gb"] = max(memory)
    return out


def tower_overrides(s: dict) -> list[str]:
    """The very towers open_clip builds for the name (random weights), when the sizes name one."""
    name = s["open_clip_name"]
    return [f"modality.image.open_clip={name}", f"modality.text.open_clip={name}"] if name else []


def ours(s: dict, data: str, modalities: str, batch: int, run_dir: Path, peak_tflops: float) -> dict:
    """contrastive-train as a user starts it (python -m, the console script's module)."""
    overrides = [
        f"model={s['model']}",
        f"modalities={modalities}",
        f"data.train={data}",
        "data.eval=null",
        f"data.batch_size={batch}",
        f"data.num_workers={s['workers']}",
        f"trainer.max_steps={s['steps']}",
        f"trainer.log_every={s['log_every']}",
        "trainer.progress=false",
        f"trainer.precision={s['precision']}",
        f"trainer.device={s['device']}",
        f"trainer.peak_tflops={peak_tflops}",
        "export=false",
        "optim.scheduler.warmup_steps=5",
        f"hydra.run.dir={run_dir}",
    ]
    overrides += tower_overrides(s)
    proc = subprocess.run(
        [sys.executable, "-m", "contrastive.cli.train", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2500:])
    return {"batch_size": batch, **_metrics(run_dir)}


def composed(modalities: list[str], *overrides: str):
    """(the train config composed with `overrides`, the modalities built from it), as the CLI does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from contrastive.builders import build_modalities
    from contrastive.config import CONFIG_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return cfg, build_modalities(modalities, OmegaConf.to_container(cfg.modality))


def flops_per_sample(s: dict, modalities: list[str]) -> float:
    """Training FLOPs of one sample through the towers, counted as contrastive-train counts them."""
    import torch

    from contrastive.flops import training_flops_per_sample
    from contrastive.model import ContrastiveModel

    cfg, mods = composed(modalities, f"model={s['model']}", *tower_overrides(s))

    with torch.device("meta"):
        model = ContrastiveModel(mods, cfg.model.embed_dim)
    return sum(training_flops_per_sample(model).values())


def image_text_stage(s: dict, result: dict, work: Path) -> dict:
    """The largest candidate batch that fits, then its figures."""
    peak = result["peak"]["bf16_tflops"]
    tried = []
    for batch in s["batches"]:
        try:
            found = ours(
                s, result["shards"]["image_text"]["path"], "[image,text]", batch, work / f"ours-it-{batch}", peak
            )
            return {**found, "candidates_tried": tried + [batch]}
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            tried.append(batch)
            print(f"  batch {batch}: out of memory", flush=True)
    raise RuntimeError(f"no candidate batch fits: {tried}")


def open_clip_stage(s: dict, result: dict, work: Path, site: str) -> dict:
    """open_clip's trainer on the same shards, model, batch and workers; its step times from its log."""
    batch = result["image_text"]["batch_size"]
    run_dir = work / f"open-clip-{batch}"
    run_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(Path(result["shards"]["image_text"]["path"]).glob("it-*.tar"))
    model = s["open_clip_name"]
    if model is None:
        (run_dir / "model").mkdir(exist_ok=True)
        (run_dir / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
        model = f"local-dir:{run_dir / 'model'}"
    args = [
        "-m",
        "open_clip_train.main",
        "--train-data",
        f"{shards[0].parent}/it-{{000000..{len(shards) - 1:06d}}}.tar",
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",
        "--train-num-samples",
        str(batch * s["steps"]),
        "--batch-size",
        str(batch),
        "--epochs",
        "1",
        "--workers",
        str(s["workers"]),
        "--model",
        model,
        "--lr",
        "5e-4",
        "--warmup",
        "5",
        "--wd",
        "0.1",
        "--precision",
        s["open_clip_precision"],
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--logs",
        str(run_dir),
        "--name",
        "run",
        "--seed",
        "0",
        "--device",
        s["device"],
        "--report-to",
        "",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run([sys.executable, *args], cwd=run_dir, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-1500:] + proc.stderr[-2500:])
    log = (run_dir / "run" / "out.log").read_text()
    times = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", log)][s["warmup"] :]
    data = [float(x) for x in re.findall(r"Data \(t\): ([0-9.]+)", log)][s["warmup"] :]
    if not times:
        raise RuntimeError(f"no step times after the warm-up in {run_dir}/run/out.log")
    sps = batch / mean(times)
    flops = flops_per_sample(s, ["image", "text"])
    return {
        "batch_size": batch,
        "samples_per_s": sps,
        "mfu": flops * sps / (result["peak"]["bf16_tflops"] * 1e12),
        "data_wait_frac": mean(data) / mean(times),
        "steps_timed": len(times),
    }


def trimodal_stage(s: dict, result: dict, work: Path) -> dict:
    batch = result["image_text"]["batch_size"]
    return ours(
        s,
        result["shards"]["trimodal"]["path"],
        "[image,audio,text]",
        batch,
        work / "ours-tri",
        result["peak"]["bf16_tflops"],
    )


def loader_stage(s: dict, result: dict) -> dict:
    """Our pipeline alone (decode, transforms, batching), timed from its first batch, per worker count."""
    from contrastive.data import ShardDataset, load_sources, make_loader

    _, mods = composed(["image", "text"], f"model={s['model']}")
    sources = load_sources(result["shards"]["image_text"]["path"])
    batch = 256 if s["device"] == "cuda" else 8
    demand = result.get("image_text", {}).get("samples_per_s")
    out = {"batch_size": batch, "model_demand_samples_per_s": demand}
    for workers in s["loader_workers"]:
        ds = ShardDataset(sources, mods, batch_size=batch, train=True, num_workers=workers, seed=0)
        ds.endless = True
        it = iter(make_loader(ds))
        next(it)
        t0, n = time.perf_counter(), 0
        for _ in range(s["loader_batches"]):
            n += sum(1 for k in next(it)["__key__"] if k)
        sps = n / (time.perf_counter() - t0)
        out[f"{workers}_workers"] = {"samples_per_s": sps, "over_demand": sps / demand if demand else None}
        del it
    return out


def loss_stage(s: dict) -> dict:
    from types import SimpleNamespace

    from loss_memory import run_child

    args = SimpleNamespace(
        dim=s["loss_dim"], tile=4096 if s["device"] == "cuda" else 1024, device=s["device"], repeats=3
    )
    out = {"global_batch": s["loss_n"], "dim": s["loss_dim"], "tile": args.tile}
    for impl in ("ours_tiled", "ours_plain", "open_clip"):
        out[impl] = run_child(impl, s["loss_n"], args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--open-clip-site", required=True, help="a folder with webdataset 0.2.86 (open_clip_train's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/contrastive-gpu-check"))
    parser.add_argument(
        "--budget", type=float, default=400.0, help="seconds: a stage that would start later is skipped"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()
    s = DRY if args.dry_run else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget
    result: dict = {"dry_run": args.dry_run, "settings": s, "goals": GOALS}

    stages = [
        ("env", lambda: env_stage(s)),
        ("peak", lambda: peak_stage(s)),
        ("shards", lambda: shards_stage(s, args.work)),
        ("image_text", lambda: image_text_stage(s, result, args.work)),
        ("open_clip", lambda: open_clip_stage(s, result, args.work, args.open_clip_site)),
        ("loader", lambda: loader_stage(s, result)),
        ("trimodal", lambda: trimodal_stage(s, result, args.work)),
        ("loss", lambda: loss_stage(s)),
    ]
    for name, run in stages:
        if time.time() > deadline:
            result[name] = {"skipped": "the time budget ran out"}
        else:
            print(f"== {name}", flush=True)
            t0 = time.time()
            try:
                result[name] = run()
            except Exception as e:  # noqa: BLE001 - recorded; the next stage runs
                result[name] = {"error": f"{type(e).__name__}: {e}"}
            result[name]["seconds"] = round(time.time() - t0, 1)
        print(f"   {json.dumps(result[name])[:600]}", flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    ours_it, theirs = result.get("image_text", {}), result.get("open_clip", {})
    if "samples_per_s" in ours_it and "samples_per_s" in theirs:
        result["image_text_over_open_clip"] = ours_it["samples_per_s"] / theirs["samples_per_s"]
        result["goals_met"] = {
            "mfu": ours_it["mfu"] >= GOALS["image_text_mfu"],
            "over_open_clip": result["image_text_over_open_clip"] >= GOALS["image_text_over_open_clip"],
        }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    failed = [name for name, _ in stages if "error" in result.get(name, {})]
    print(f"wrote {args.out}" + (f"; stages that failed: {failed}" if failed else ""), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
