"""The CPU lead, guarded: contrastive-train's step against open_clip's trainer's on the tiny towers in
fp32, both run by this script one after the other so that their ratio holds on a noisy machine, and
a non-zero exit when ours falls below `--floor` times open_clip's.

    .venv/bin/python benchmarks/step_guard.py --log-every 1 --floor 1.2   # what .ci/run runs (~3 min)
    .venv/bin/python benchmarks/step_guard.py                             # the default logging (every 10)
    .venv/bin/python benchmarks/step_guard.py --tree /tmp/old             # ours from another checkout

The two sides are vs_open_clip.py's (the same towers, batch 64, AdamW, warm-up and cosine, clipping,
one torch thread, one loader worker, one process) on synthetic image-text shards (32 px JPEG and a
caption, benchmarks/gpu/synthetic.py), each logging every `--log-every` steps (ours
`trainer.log_every`, open_clip `--log-every-n-steps`), measuring at its default. Logging every step
is what vs_open_clip.py does, and what shows a per-step cost first: the telemetry that ran at every
logging step (12d50e5) measured 0.86x there and 1.41x at every 10 steps, against 1.52x before it and
1.55x once measuring moved to its own interval. A side's figure is the median over its logging
windows of the window's mean step time (data loading included), the first 20 steps left out as
warm-up; the ratio is open_clip's over ours. open_clip's trainer reads its shards with webdataset
0.2.86, installed (with pandas) into a folder of its own on first use, as check.sh --dry-run does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
from common import train_rows_from  # noqa: E402
from synthetic import shards_stage  # noqa: E402
from vs_open_clip import COMMON, CONFIGS, ours_overrides, run_open_clip  # noqa: E402

SITE = REPO / ".open-clip-site"  # webdataset 0.2.86 and pandas for open_clip_train (ignored by git)


def open_clip_site() -> Path:
    if not (SITE / "webdataset").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target",
             str(SITE), "webdataset==0.2.86", "pandas", "python-dateutil", "pytz", "tzdata"],
            check=True, stderr=subprocess.DEVNULL,  # pip's notes on the machine's optional local indexes
        )  # fmt: skip
    return SITE


def ours(data: Path, run_dir: Path, steps: int, seed: int, tree: Path, log_every: int) -> list[float]:
    """Each logging window's mean step time (s) of contrastive-train from the checkout `tree`."""
    cfg = {**CONFIGS["tiny"], "steps": steps}
    args = [*ours_overrides(cfg, data, run_dir, seed, "fp32", log_every), "export=false"]
    rows = train_rows_from(tree, args, run_dir, env={"OMP_NUM_THREADS": str(COMMON["threads"])})
    return [COMMON["batch_size"] / r["samples_per_s"] for r in rows if "samples_per_s" in r]


def theirs(data: Path, run_dir: Path, steps: int, seed: int, log_every: int) -> list[float]:
    """Each logging window's mean step time (s) of open_clip_train.main on the same shards."""
    cfg = {**CONFIGS["tiny"], "steps": steps}
    run = run_open_clip(
        Path(sys.executable), cfg, data, run_dir, seed, "fp32", log_every=log_every,
        env={"PYTHONPATH": str(open_clip_site())}, save=False,
    )  # fmt: skip
    return run["step_times"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2, help="runs a side, alternating")
    parser.add_argument("--floor", type=float, default=0.0, help="exit 1 when ours / open_clip's is below it")
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose contrastive is 'ours'")
    parser.add_argument("--log-every", type=int, default=10, help="both sides' logging interval (steps)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="step-guard-"))
    settings = {"image_size": CONFIGS["tiny"]["image_size"], "audio_seconds": 1.0, "samples": 2048}
    data = Path(shards_stage(settings, work, kinds=("image_text",))["image_text"]["path"])
    windows: dict[str, list[float]] = {"ours": [], "open_clip": []}
    for rep in range(args.repeats):
        for side in ("ours", "open_clip") if rep % 2 == 0 else ("open_clip", "ours"):
            run_dir = work / f"{side}-{rep}"
            got = (
                ours(data, run_dir, args.steps, rep, args.tree.resolve(), args.log_every)
                if side == "ours"
                else theirs(data, run_dir, args.steps, rep, args.log_every)
            )
            got = got[max(1, 20 // args.log_every) :]  # the first 20 steps (or window): warm-up
            windows[side] += got
            print(f"{side} run {rep + 1}: median window step {1e3 * statistics.median(got):.1f} ms", flush=True)
    medians = {side: statistics.median(w) for side, w in windows.items()}
    ratio = medians["open_clip"] / medians["ours"]
    from contrastive.flops import cpu_name

    result = {
        "ours_samples_per_s": COMMON["batch_size"] / medians["ours"],
        "open_clip_samples_per_s": COMMON["batch_size"] / medians["open_clip"],
        "ratio": ratio,
        "floor": args.floor,
        "steps": args.steps,
        "repeats": args.repeats,
        "tree": str(args.tree),
        "log_every": args.log_every,
        "cpu": cpu_name(),
    }
    print(
        f"ours {result['ours_samples_per_s']:.0f} samples/s, open_clip {result['open_clip_samples_per_s']:.0f}: "
        f"{ratio:.2f}x" + (f" (floor {args.floor:.2f}x)" if args.floor else ""),
        flush=True,
    )
    print(json.dumps(result))
    if ratio < args.floor:
        print(f"step_guard: ours is {ratio:.2f}x open_clip's, below the floor of {args.floor:.2f}x", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
