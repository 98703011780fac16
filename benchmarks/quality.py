"""Which recipe trains the best model for the same compute? Each recipe on the emoji set
(`contrastive-data emoji`: unseen concepts held out) for the same wall-clock budget on this machine,
3 seeds, against the plain recipe and open_clip's own trainer.

    .venv/bin/python benchmarks/quality.py                          # ~2 h on a quiet 2-core machine
    .venv/bin/python benchmarks/quality.py --budget 60 --seeds 0 --recipes plain "patch dropout"
    .venv/bin/python benchmarks/quality.py --resume     # after an interruption: finished runs are kept

Recipes (all `experiment=emoji`: tiny towers, 64-px images, 2-s audio, batch 128, one thread and one
loader worker on each side):
- plain: image, audio and text, three pairs;
- image-text: the same without audio (what open_clip's run trains: our trainer against theirs on one task);
- patch dropout: half of the image's and the spectrogram's patches dropped, the last tenth of the
  steps unmasked (FLIP);
- EMA: `trainer.ema` (decay 0.995 from a fifth of the way in), scored on the average;
- distillation: `distill.kind=logits` from a teacher (the same towers trained `--teacher-factor`
  times the plain recipe's steps; its training is not counted in the budget), its embeddings
  precomputed once by `contrastive-embed` (`distill.teacher=features:<dir>`), so a step costs little
  more than plain's;
- all: the three together;
- open_clip: open_clip_train on the same shards without their audio (image-text only), the same
  towers, batch, optimizer and schedule (benchmarks/vs_open_clip.py's runner); its image-text figures.

Equal wall-clock: each recipe's step time is measured first (a short run, the steps after the
warm-up; EMA's update is part of a step), and the recipe gets budget / step time steps. Evaluation
and process start-up are outside the budget. Figures: zero-shot over the 271 unseen concepts' names
(`heldout`: near chance after a short run; generalisation to new names needs far more data), and on
new views of the 1,083 training concepts (`seen`: other renderings, voices and captions) a
thousand-way zero-shot and image<->text R@1 and R@10; mean and half the range over the seeds. The
headline is seen R@1. The last line is one JSON object with every run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import vs_open_clip  # the open_clip runner and the evaluator of its checkpoints
from common import BIN, REPO, cells, data_set, over_seeds, train_rows

BATCH = 128
PROMPTS = ["{label}", "an emoji of {label}", "a picture of {label}"]
# eval/<key>: data.eval, the unseen concepts; eval/seen/<key>: new views of the training concepts
FIGURES = {
    "unseen zero-shot image": "zero_shot/image->text/acc",
    "seen zero-shot image": "seen/zero_shot/image->text/acc",
    "seen zero-shot audio": "seen/zero_shot/audio->text/acc",
    "seen R@1 image->text": "seen/retrieval/image->text/R@1",
    "seen R@1 text->image": "seen/retrieval/text->image/R@1",
    "seen R@10 text->image": "seen/retrieval/text->image/R@10",
}
HEADLINE = ("seen R@1 image->text", "seen R@1 text->image")
CALIBRATION_STEPS, WARMUP = 45, 15
# open_clip's towers: experiment=emoji's (model=tiny at 64 px, 32-token captions)
OPEN_CLIP_CFG = {
    "embed_dim": 64,
    "image_size": 64,
    "vision": dict(patch_size=8, width=64, layers=2, head_width=32),
    "text": dict(context_length=32, width=64, heads=2, layers=2),
    "lr": 2e-3,
}
# each trainer with its own default clipping (none, both): vs_open_clip.py clips both at 1.0
OPEN_CLIP_COMMON = {**vs_open_clip.COMMON, "batch_size": BATCH, "threads": 1, "workers": 1, "grad_clip": 0.0}


def recipes(teacher_features: Path | None, steps: int) -> dict[str, list[str]]:
    """Each recipe's overrides for a run of `steps` steps."""
    dropout = [
        "modality.image.patch_dropout=0.5",
        "modality.audio.patch_dropout=0.5",
        f"trainer.unmasked_steps={steps // 10}",
    ]
    ema = [f"trainer.ema={{decay: 0.995, start_step: {steps // 5}}}"]
    distill = [f"distill.teacher=features:{teacher_features}", "distill.kind=logits"] if teacher_features else []
    return {
        "plain": [],
        "image-text": ["modalities=[image,text]"],  # the same towers without audio: what open_clip's run trains
        "patch dropout": dropout,
        "EMA": ema,
        "distillation": distill,
        "all": dropout + ema + distill,
    }


def train(data: Path, run_dir: Path, steps: int, seed: int, extra: list[str], evaluate: bool = True) -> list[dict]:
    """One run of `experiment=emoji`, one thread (as open_clip's side); its metrics rows."""
    overrides = [
        "experiment=emoji",
        f"data.train={data / 'train'}",
        f"data.eval={data / 'heldout'}" if evaluate else "data.eval=null",
        f"eval.sets.seen.path={data / 'seen'}" if evaluate else "~eval.sets.seen",
        f"trainer.seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.log_every=1",
        "trainer.save_every=0",
        "trainer.threads=1",
        *extra,
    ]
    return train_rows(overrides, run_dir, threads=1)


def step_seconds(rows: list[dict]) -> float:
    """The mean step time after the warm-up (data, forward, backward, update, EMA)."""
    times = [BATCH / r["samples_per_s"] for r in rows if "samples_per_s" in r and r["step"] > WARMUP]
    return statistics.mean(times)


def figures(rows: list[dict], averaged: bool) -> dict[str, float]:
    """The final evaluation's figures: of the weights' average when the recipe keeps one."""
    final = [r for r in rows if "eval/zero_shot/image->text/acc" in r][-1]
    prefix = "eval/ema/" if averaged else "eval/"
    return {name: final.get(prefix + key, float("nan")) for name, key in FIGURES.items()}


def teacher(data: Path, out: Path, steps: int, resume: bool) -> Path:
    """The teacher: plain, `steps` steps; its embeddings of the training set, for distill.teacher
    (an earlier run's kept with --resume)."""
    features = out / "teacher-features"
    if not resume:
        shutil.rmtree(features, ignore_errors=True)
    if not (features / "embed.json").exists():
        taught = train(data, out / "teacher", steps, 100, ["export=true"])
        print("teacher: " + ", ".join(f"{k} {v:.3f}" for k, v in figures(taught, False).items()), flush=True)
        subprocess.run(
            [
                str(BIN / "contrastive-embed"),
                "embed",
                str(out / "teacher" / "export"),
                "--data",
                str(data / "train"),
                "--out",
                str(features),
            ],
            check=True,
            capture_output=True,
        )
    return features


def open_clip_run(python: Path, it_data: dict, run_dir: Path, steps: int, seed: int) -> dict:
    """open_clip_train for `steps` steps (its step times and its checkpoint)."""
    cfg = {**OPEN_CLIP_CFG, "steps": steps}
    shutil.rmtree(run_dir, ignore_errors=True)
    return vs_open_clip.run_open_clip(python, cfg, it_data["train"], run_dir, seed, "fp32", OPEN_CLIP_COMMON)


def open_clip_figures(run: dict, it_data: dict) -> dict[str, float]:
    """Its image-text figures on both evaluation splits, by our evaluator (no audio tower: NaN)."""
    cfg = {**OPEN_CLIP_CFG, "steps": 0}
    metrics = {}
    for split, prefix in (("heldout", ""), ("seen", "seen/")):
        found = vs_open_clip.heldout_metrics(cfg, run["weights"], it_data[split], False, PROMPTS)
        metrics.update({prefix + k: v for k, v in found.items()})
    return {name: metrics.get(key, float("nan")) for name, key in FIGURES.items()}


def summary_line(name: str, found: list[dict[str, float]], steps: int) -> tuple[str, dict]:
    summary = over_seeds(found, FIGURES)
    return f"{name:14s}{steps:>6d}" + cells(summary, FIGURES, 23), {"steps": steps, **summary}


def calibrate(args, data: Path, python, it_data) -> dict[str, float]:
    """Seconds per step of each recipe (and open_clip's), measured briefly; kept in calibration.json,
    and with --resume read back from it (the same machine's figures, for every recipe it holds)."""
    saved = args.out / "calibration.json"
    seconds = json.loads(saved.read_text()) if args.resume and saved.exists() else {}
    probe = recipes(Path("/nonexistent"), CALIBRATION_STEPS)
    measured = {}
    for name in [n for n in args.recipes if n not in seconds]:
        extra = [o for o in probe[name] if not o.startswith("distill.")]  # a teacher lookup costs ~nothing
        found = train(data, args.out / "calibrate" / name.replace(" ", "-"), CALIBRATION_STEPS, 0, extra, False)
        measured[name] = step_seconds(found)
    plain = measured.get("plain") or seconds.get("plain")
    if "patch dropout" in measured and plain:  # its last tenth runs unmasked, at plain's pace
        measured["patch dropout"] = 0.9 * measured["patch dropout"] + 0.1 * plain
    if "all" in measured and plain:  # its last tenth unmasked too, with the average kept
        measured["all"] = 0.9 * measured["all"] + 0.1 * (measured.get("EMA") or seconds.get("EMA") or plain)
    if python is not None and "open_clip" not in seconds:
        calib = open_clip_run(python, it_data, args.out / "calibrate" / "open_clip", CALIBRATION_STEPS, 0)
        measured["open_clip"] = statistics.mean(calib["step_times"][WARMUP:])
    seconds.update(measured)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(seconds, indent=1) + "\n")
    return {n: v for n, v in seconds.items() if n in args.recipes or (n == "open_clip" and python is not None)}


def finished(run_dir: Path, resume: bool) -> dict[str, float] | None:
    """A finished run's figures (figures.json), with --resume."""
    done = run_dir / "figures.json"
    return json.loads(done.read_text()) if resume and done.exists() else None


def keep(run_dir: Path, found: dict[str, float]) -> dict[str, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "figures.json").write_text(json.dumps(found) + "\n")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of training per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--recipes", nargs="+", default=["plain", "image-text", "patch dropout", "EMA", "distillation", "all"]
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the calibration, the teacher and every finished run of --out"
    )
    parser.add_argument("--teacher-factor", type=float, default=3.0, help="the teacher's steps over plain's")
    parser.add_argument("--no-open-clip", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality")
    args = parser.parse_args()
    data = data_set("emoji")
    cpu = open("/proc/cpuinfo").read()
    model_name = re.search(r"model name\s*:\s*(.*)", cpu)
    print(f"CPU: {model_name.group(1) if model_name else '?'}, {len(os.sched_getaffinity(0))} cores", flush=True)

    python = it_data = None
    if not args.no_open_clip:
        python = vs_open_clip.open_clip_python()
        it_data = vs_open_clip.image_text_shards(args.out / "image-text", data, ("train", "heldout", "seen"))
    seconds = calibrate(args, data, python, it_data)
    steps = {name: int(args.budget / s) for name, s in seconds.items()}
    print("steps in the budget: " + ", ".join(f"{n} {s} ({seconds[n]:.3f} s/step)" for n, s in steps.items()))

    features = None
    if {"distillation", "all"} & set(args.recipes):
        base = steps.get("plain", min(steps.values()))
        features = teacher(data, args.out, int(args.teacher_factor * base), args.resume)

    results: dict[str, list[dict[str, float]]] = {name: [] for name in [*args.recipes, "open_clip"] if name in steps}
    for seed in args.seeds:
        for name in args.recipes:
            extra = recipes(features, steps[name])[name]
            averaged = any(o.startswith("trainer.ema") for o in extra)
            run_dir = args.out / f"{name.replace(' ', '-')}-{seed}"
            found = finished(run_dir, args.resume) or figures(
                train(data, run_dir, steps[name], seed, ["export=false", *extra]), averaged
            )
            results[name].append(keep(run_dir, found))
            print(f"{name:14s} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)
        if python is not None:
            run_dir = args.out / f"open_clip-{seed}"
            found = finished(run_dir, args.resume) or open_clip_figures(
                open_clip_run(python, it_data, run_dir, steps["open_clip"], seed), it_data
            )
            results["open_clip"].append(keep(run_dir, found))
            print(f"{'open_clip':14s} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)

    print(f"\nbudget {args.budget:.0f} s of training per run, seeds {args.seeds}")
    print(f"{'recipe':14s}{'steps':>6s}" + "".join(f"{n:>23s}" for n in FIGURES))
    summary = {}
    for name, found in results.items():
        line, summary[name] = summary_line(name, found, steps[name])
        print(line)
    if "plain" in summary:
        plain = summary["plain"]["mean"]
        for name, s in summary.items():
            s["R@1_gain_points"] = {k: 100 * (s["mean"][k] - plain[k]) for k in HEADLINE}
            gains = ", ".join(f"{k} {v:+.1f}" for k, v in s["R@1_gain_points"].items())
            print(f"{name} over plain, points: {gains}")
    print(json.dumps({"budget_s": args.budget, "seconds_per_step": seconds, "runs": results, "summary": summary}))


if __name__ == "__main__":
    main()
