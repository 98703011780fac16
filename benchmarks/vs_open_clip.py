"""contrastive-train against open_clip's own trainer (open_clip_train.main), side by side.

    .venv/bin/python benchmarks/vs_open_clip.py   # tiny and small; fp32, bf16, amp_bf16; 2 runs each (~50 min)
    .venv/bin/python benchmarks/vs_open_clip.py --configs tiny --precision fp32 --repeats 1

Same image-text shards (the demo set without its audio), same tower configs, batch size, optimizer
(AdamW, lr, betas, eps, weight decay and the parameters it decays), warm-up + cosine schedule,
gradient clipping, precision (fp32; bf16: ours DeepSpeed's bf16 weights with fp32 master weights,
theirs amp_bf16, autocast over fp32 weights; amp_bf16: autocast over fp32 weights on both sides),
torch threads and DataLoader workers, one process each, run
in this script one after the other, alternating (ours, theirs, theirs, ours, ...). open_clip's
trainer needs webdataset 0.2.86, so it runs from a venv of its own (.venv-openclip, built on first
use).

Each repeat uses another seed (0, 1, ...) on both sides; quality is averaged over them.
Throughput: both trainers log every step's wall time, data loading included; samples/s is the batch
size over the mean step time after the warm-up steps. Quality: both models, after the same number of
steps, are evaluated by the same code (contrastive's evaluator; open_clip's checkpoint is loaded into
our towers through open_clip's key layout) on the held-out split: zero-shot image->text accuracy and
image<->text R@1. The last line is one JSON object with both sides' figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-openclip"
PROMPTS = ["the digit {label}", "a photo of the number {label}", "{label}"]
CONFIGS = {
    "tiny": {
        "embed_dim": 64,
        "image_size": 32,
        "vision": dict(patch_size=8, width=64, layers=2, head_width=32),
        "text": dict(context_length=16, width=64, heads=2, layers=2),
        "steps": 400,
        "lr": 2e-3,
    },
    "small": {
        "embed_dim": 128,
        "image_size": 64,
        "vision": dict(patch_size=8, width=256, layers=4, head_width=64),
        "text": dict(context_length=16, width=256, heads=4, layers=4),
        "steps": 150,
        # at 2e-3 the small towers' runs (either trainer's) sat at loss ln(64) for tens of steps
        # and ended anywhere from chance to 80%; at 5e-4 every run of either trainer converged
        "lr": 5e-4,
    },
}
COMMON = dict(
    batch_size=64,
    betas=(0.9, 0.98),
    eps=1e-6,
    weight_decay=0.1,
    warmup=50,
    grad_clip=1.0,
    workers=1,
    threads=1,
    warmup_steps_skipped=20,
)


def open_clip_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print("building .venv-openclip (open_clip_torch[training], webdataset 0.2.86) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "torch==2.13.0",
                "torchvision==0.28.0",
                "open_clip_torch[training]==3.3.0",
            ],
            check=True,
        )
    if subprocess.run([str(python), "-c", "import torchvision"], capture_output=True).returncode != 0:
        # the same fix scripts/install.sh applies: CUDA-built torchvision beside the CPU torch
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (Path(site) / "_contrastive_torchvision_shim.py").write_text(
            (REPO / "scripts/torchvision_cpu_shim.py").read_text()
        )
        (Path(site) / "contrastive_torchvision_shim.pth").write_text("import _contrastive_torchvision_shim\n")
    return python


def image_text_shards(
    out: Path, source: Path = REPO / "data" / "demo", splits: tuple[str, ...] = ("train", "heldout")
) -> dict[str, Path]:
    """A data set's image-text samples (audio left out, so both loaders read the same bytes); by
    default the demo set's, made here if missing."""
    from contrastive.data.shards import ShardWriter
    from contrastive.data.sources import iter_tar_samples

    if not (source / "heldout" / "sizes.json").exists():
        subprocess.run([str(REPO / ".venv/bin/contrastive-data"), "demo", str(source)], check=True)
    paths = {}
    for split in splits:
        with ShardWriter(out / split, prefix="it", max_count=400) as writer:
            for tar in sorted((source / split).glob("*.tar")):
                for s in iter_tar_samples(str(tar)):
                    image = next((e for e in ("png", "jpg") if e in s), None)
                    if image and "txt" in s:
                        writer.write({"__key__": s["__key__"], image: s[image], "txt": s["txt"], "json": s["json"]})
        paths[split] = out / split
    return paths


def ours_overrides(cfg: dict, data: Path, run_dir: Path, seed: int, precision: str, log_every: int = 1) -> list[str]:
    """contrastive-train's overrides for `cfg`'s towers and COMMON's recipe (open_clip's side's)."""
    v, t = cfg["vision"], cfg["text"]
    return [
        "modalities=[image,text]",
        "model=tiny",
        f"model.embed_dim={cfg['embed_dim']}",
        f"data.train={data}",
        "data.eval=null",
        f"trainer.max_steps={cfg['steps']}",
        f"data.batch_size={COMMON['batch_size']}",
        f"data.num_workers={COMMON['workers']}",
        f"trainer.threads={COMMON['threads']}",
        f"trainer.log_every={log_every}",
        f"optim.optimizer.lr={cfg['lr']}",
        f"optim.optimizer.weight_decay={COMMON['weight_decay']}",
        f"optim.optimizer.betas=[{COMMON['betas'][0]},{COMMON['betas'][1]}]",
        f"optim.optimizer.eps={COMMON['eps']}",
        # open_clip_train's parameter groups (it decays embeddings; by default we do not)
        "optim.no_decay=[logit_scale]",
        f"optim.scheduler.warmup_steps={COMMON['warmup']}",
        f"optim.grad_clip={COMMON['grad_clip']}",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
        f"modality.image.image_size={cfg['image_size']}",
        *[f"modality.image.{k}={x}" for k, x in v.items()],
        *[f"modality.text.{k}={x}" for k, x in t.items()],
        f"eval.prompts={json.dumps(PROMPTS)}",
        f"trainer.seed={seed}",
        f"trainer.precision={precision}",
    ]


def run_ours(name: str, cfg: dict, data: Path, run_dir: Path, seed: int, precision: str) -> dict:
    args = ours_overrides(cfg, data, run_dir, seed, precision)
    subprocess.run(
        [str(REPO / ".venv/bin/contrastive-train"), *args],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": str(COMMON["threads"])},
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = [COMMON["batch_size"] / r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return {"step_times": step_times, "weights": run_dir / "export"}


def run_open_clip(
    python: Path,
    cfg: dict,
    data: Path,
    run_dir: Path,
    seed: int,
    precision: str,
    common: dict = COMMON,
    *,
    log_every: int = 1,
    env: dict | None = None,
    save: bool = True,
) -> dict:
    """open_clip_train.main with `python` (its step times, and its checkpoint where `save`); `env`
    added to the environment (a PYTHONPATH with its webdataset)."""
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True)
    model_cfg = {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": {"image_size": cfg["image_size"], **cfg["vision"]},
        "text_cfg": cfg["text"],
    }
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    shards = sorted(p.name for p in data.glob("*.tar"))
    urls = f"{data}/it-{{{shards[0][3:9]}..{shards[-1][3:9]}}}.tar"
    args = [
        "-m",
        "open_clip_train.main",
        "--train-data",
        urls,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(cfg["steps"] * common["batch_size"]),
        "--batch-size",
        str(common["batch_size"]),
        "--epochs",
        "1",
        "--workers",
        str(common["workers"]),
        "--model",
        f"local-dir:{model_dir}",
        "--lr",
        str(cfg["lr"]),
        "--wd",
        str(common["weight_decay"]),
        "--warmup",
        str(common["warmup"]),
        # explicit: open_clip_train's defaults depend on the model's name (beta2 0.999, eps 1e-8 here)
        "--beta1",
        str(common["betas"][0]),
        "--beta2",
        str(common["betas"][1]),
        "--eps",
        str(common["eps"]),
        *(["--grad-clip-norm", str(common["grad_clip"])] if common["grad_clip"] else []),  # 0: its default, none
        "--logs",
        str(run_dir),
        "--precision",
        {"fp32": "fp32", "bf16": "amp_bf16", "amp_bf16": "amp_bf16"}[precision],
        "--name",
        "run",
        "--log-every-n-steps",
        str(log_every),
        "--save-frequency",
        str(int(save)),
        "--seed",
        str(seed),
        "--device",
        "cpu",
    ]
    out = subprocess.run(
        [str(python), *args],
        capture_output=True,
        text=True,
        cwd=run_dir,
        env={**os.environ, "OMP_NUM_THREADS": str(common["threads"]), **(env or {})},
    )
    if out.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    log = (run_dir / "run" / "out.log").read_text()
    step_times = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    return {"step_times": step_times, "weights": run_dir / "run" / "checkpoints" / "epoch_1.pt", "model_cfg": model_cfg}


def evaluate(cfg: dict, weights: Path, heldout: Path, ours: bool) -> dict:
    metrics = heldout_metrics(cfg, weights, heldout, ours, PROMPTS)
    return {
        "zero_shot_image_to_text": metrics["zero_shot/image->text/acc"],
        "R@1_image_to_text": metrics["retrieval/image->text/R@1"],
        "R@1_text_to_image": metrics["retrieval/text->image/R@1"],
    }


def heldout_metrics(cfg: dict, weights: Path, heldout: Path, ours: bool, prompts: list[str]) -> dict[str, float]:
    """Every figure of our evaluator on the held-out split, for our export or open_clip's checkpoint."""
    import torch

    from contrastive.builders import build_modalities
    from contrastive.data.settings import DataConfig
    from contrastive.evaluation import EvalConfig, Evaluator, resolve_set
    from contrastive.export import load_pretrained
    from contrastive.model import ContrastiveModel
    from contrastive.towers import init_tower

    if ours:
        model = load_pretrained(weights)
    else:
        mods = build_modalities(
            ["image", "text"], {"image": {"image_size": cfg["image_size"], **cfg["vision"]}, "text": cfg["text"]}
        )
        model = ContrastiveModel(mods, cfg["embed_dim"])
        for name in ("image", "text"):
            init_tower(name, model.encoders[name], mods[name], weights)
    model.eval()
    heldout_set = resolve_set("", {"path": str(heldout)})
    evaluator = Evaluator(
        [heldout_set], model.modalities, EvalConfig(prompts=prompts), DataConfig(eval_batch_size=256, num_workers=0)
    )
    metrics, _ = evaluator(model, torch.device("cpu"))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16", "amp_bf16"], choices=["fp32", "bf16", "amp_bf16"]
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and config, alternating")
    args = parser.parse_args()
    python = open_clip_python()
    work = Path(tempfile.mkdtemp(prefix="vs-open-clip-"))
    data = image_text_shards(work / "data")
    from contrastive.flops import cpu_name

    # the CPU decides the figures: without bf16 instructions (avx512_bf16/AMX) 16-bit runs are emulated
    cpu = cpu_name()
    result = {"settings": {**COMMON, "cpus": os.cpu_count(), "cpu": cpu}, "configs": {}}
    print(f"CPU: {cpu}", file=sys.stderr, flush=True)
    for name, precision in [(n, p) for n in args.configs for p in args.precision]:
        cfg = CONFIGS[name]
        label = f"{name}-{precision}"
        times = {"contrastive": [], "open_clip": []}
        per_run: dict[str, list[float]] = {"contrastive": [], "open_clip": []}  # each run's samples/s
        quality: dict[str, list] = {"contrastive": [], "open_clip": []}
        for rep in range(args.repeats):
            order = ["contrastive", "open_clip"] if rep % 2 == 0 else ["open_clip", "contrastive"]
            for side in order:
                run_dir = work / f"{label}-{side}-{rep}"
                print(f"{label}: {side} run {rep + 1} ...", file=sys.stderr, flush=True)
                run = (
                    run_ours(name, cfg, data["train"], run_dir, seed=rep, precision=precision)
                    if side == "contrastive"
                    else run_open_clip(python, cfg, data["train"], run_dir, seed=rep, precision=precision)
                )
                kept = run["step_times"][COMMON["warmup_steps_skipped"] :]
                times[side] += kept
                per_run[side].append(COMMON["batch_size"] / statistics.mean(kept))
                quality[side].append(evaluate(cfg, run["weights"], data["heldout"], ours=side == "contrastive"))
        row = {"config": name, "precision": precision, "steps": cfg["steps"]}
        for side in times:
            row[side] = {
                "samples_per_s": COMMON["batch_size"] / statistics.mean(times[side]),
                "median_step_s": statistics.median(times[side]),
                # quality averaged over the runs (seed 0, 1, ...: one per repeat), and each run's
                **{k: statistics.mean(q[k] for q in quality[side]) for k in quality[side][0]},
                "runs": quality[side],
            }
        row["throughput_ratio"] = row["contrastive"]["samples_per_s"] / row["open_clip"]["samples_per_s"]
        # each repeat's ratio (its two runs one after the other): the spread the README shows
        row["ratio_per_repeat"] = [a / b for a, b in zip(per_run["contrastive"], per_run["open_clip"])]
        for side in per_run:
            row[side]["samples_per_s_per_run"] = per_run[side]
        row["zero_shot_delta"] = (
            row["contrastive"]["zero_shot_image_to_text"] - row["open_clip"]["zero_shot_image_to_text"]
        )
        result["configs"][label] = row

        def per_run(side: str, quality=quality) -> str:
            return "/".join(f"{q['zero_shot_image_to_text']:.1%}" for q in quality[side])

        print(
            f"{label}: contrastive {row['contrastive']['samples_per_s']:.0f} samples/s, open_clip "
            f"{row['open_clip']['samples_per_s']:.0f} samples/s ({row['throughput_ratio']:.2f}x; per repeat "
            f"{'/'.join(f'{r:.2f}' for r in row['ratio_per_repeat'])}); zero-shot "
            f"{row['contrastive']['zero_shot_image_to_text']:.1%} vs {row['open_clip']['zero_shot_image_to_text']:.1%} "
            f"(runs: {per_run('contrastive')} vs {per_run('open_clip')}); "
            f"R@1 i->t {row['contrastive']['R@1_image_to_text']:.1%} vs {row['open_clip']['R@1_image_to_text']:.1%}",
            flush=True,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
