"""Does our trainer learn as much per step as open_clip's, and which of their differences decide it?
Both train the emoji set's image-text task (quality.py's towers, batch and schedule) for the same
number of steps and seeds; our side once as it is and once for each difference taken alone;
open_clip's trainer with its own defaults.

    .venv/bin/python benchmarks/per_step.py                       # 770 steps, seeds 0 1 2 (~1.5 h)
    .venv/bin/python benchmarks/per_step.py --steps 300 --seeds 0 --variants ours "clipping at 1"
    .venv/bin/python benchmarks/per_step.py --resume              # finished runs kept (--out)
    .venv/bin/python benchmarks/per_step.py --set demo --variants ours "clipping at 1"   # the quickstart

The differences (open_clip_train 3.3's choices against ours), each a variant:
- clipping: open_clip clips only when asked (`--grad-clip-norm`); so does ours since 2026-12-05
  (`optim.grad_clip=0`). Before, ours clipped the global norm at 1.0: `clipping at 1` (and a looser
  `clipping at 5`);
- weight decay: ours exempts embeddings (positional, token, class) beside biases, norms and the
  temperature (`optim.no_decay`), open_clip decays the 2-d ones (`optim.no_decay=[logit_scale]`);
- shuffling: ours keeps a buffer of 1,000 samples (`data.shuffle_buffer`), open_clip's grows from
  1,000 to 5,000 (and shuffles shards with a buffer of 2,000): `data.shuffle_buffer=5000`.
Equal steps make the comparison independent of the machine's speed (each run one thread, seeded).
`--set demo` trains the quickstart's recipe instead (`experiment=demo`: image, audio and text, 800
steps), our variants only (open_clip's trainer has no audio tower), with distill.py's figures.
Figures: quality.py's (seen concepts' new views: zero-shot, R@1 both ways, R@10; unseen zero-shot),
mean and half the range over the seeds. The last line is one JSON object with every run's figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import distill
import quality
import vs_open_clip
from common import REPO, data_set, demo_figures, table

VARIANTS = {
    "ours": [],
    "clipping at 1": ["optim.grad_clip=1"],  # our default before 2026-12-05
    "clipping at 5": ["optim.grad_clip=5"],
    "decay embeddings": ["optim.no_decay=[logit_scale]"],
    "shuffle 5000": ["data.shuffle_buffer=5000"],
    "open_clip's choices": ["optim.no_decay=[logit_scale]", "data.shuffle_buffer=5000"],  # and no clipping
}
OPEN_CLIP_DEFAULTS = quality.OPEN_CLIP_COMMON  # open_clip_train as users run it: no clipping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=["emoji", "demo"], default="emoji", help="the task (see above)")
    parser.add_argument("--steps", type=int, help="steps of every run (default: quality.py's 770; the demo's 800)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-open-clip", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep every finished run of --out")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "per-step")
    args = parser.parse_args()
    args.steps = args.steps or (800 if args.set == "demo" else 770)
    if args.set == "demo":
        return demo(args)
    data = data_set("emoji")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
    python = it_data = None
    if not args.no_open_clip:
        python = vs_open_clip.open_clip_python()
        it_data = vs_open_clip.image_text_shards(args.out / "image-text", data, ("train", "heldout", "seen"))
        results["open_clip"] = []
    for seed in args.seeds:
        for name in args.variants:
            run_dir = args.out / f"{name.replace(' ', '-').replace(chr(39), '')}-{seed}"
            extra = ["export=false", "modalities=[image,text]", *VARIANTS[name]]
            found = quality.finished(run_dir, args.resume) or quality.figures(
                quality.train(data, run_dir, args.steps, seed, extra), False
            )
            results[name].append(quality.keep(run_dir, found))
            print(f"{name:18s} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)
        if python is not None:
            run_dir = args.out / f"open_clip-{seed}"
            found = quality.finished(run_dir, args.resume)
            if found is None:
                cfg = {**quality.OPEN_CLIP_CFG, "steps": args.steps}
                run = vs_open_clip.run_open_clip(
                    python, cfg, it_data["train"], run_dir, seed, "fp32", OPEN_CLIP_DEFAULTS
                )
                found = quality.keep(run_dir, quality.open_clip_figures(run, it_data))
            results["open_clip"].append(found)
            print(f"{'open_clip':18s} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)
    print(f"\n{'variant':18s}{'steps':>6s}" + "".join(f"{name:>23s}" for name in quality.FIGURES))
    table = {}
    for name, found in results.items():
        line, table[name] = quality.summary_line(name, found, args.steps)
        print(line)
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "summary": table, "runs": results}))


def demo(args: argparse.Namespace) -> None:
    """Our variants on the quickstart's recipe (its threads and workers), a seed at a time."""
    data = data_set("demo")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
    for seed in args.seeds:
        for name in args.variants:
            run_dir = args.out / f"demo-{name.replace(' ', '-').replace(chr(39), '')}-{seed}"
            found = quality.finished(run_dir, args.resume) or demo_figures(
                data / "train", data / "heldout", run_dir, args.steps, seed, distill.FIGURES, *VARIANTS[name]
            )
            results[name].append(quality.keep(run_dir, found))
            print(f"{name:18s} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)
    summary = table(results, distill.FIGURES, "variant")
    print(json.dumps({"set": "demo", "steps": args.steps, "seeds": args.seeds, "summary": summary, "runs": results}))


if __name__ == "__main__":
    main()
