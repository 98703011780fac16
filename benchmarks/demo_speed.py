"""The quickstart's training run as users see its speed: `experiment=demo` (image, audio and text,
2 loader workers, the default threads, measuring and logging) from two checkouts, run alternately on
the same data so that their ratio holds on a noisy machine.

    .venv/bin/python benchmarks/demo_speed.py --trees /tmp/old .        # old checkout against this one

A run's figure is the median of its logging windows' samples/s (the first window left out as
warm-up); a side's figure the median of its runs'. Evaluation and checkpoints are off, so the figure
is the training step with its data, as the progress line shows it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import data_set, train_rows_from


def samples_per_s(tree: Path, data: Path, run_dir: Path, steps: int) -> float:
    """The median logging window's samples/s of one demo run from the checkout `tree`."""
    args = [
        "experiment=demo",
        f"data.train={data / 'train'}",
        f"data.eval={data / 'heldout'}",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "export=false",
        f"hydra.run.dir={run_dir}",
    ]
    rows = train_rows_from(tree, args, run_dir)
    return statistics.median([r["samples_per_s"] for r in rows if "samples_per_s" in r][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=Path, nargs=2, required=True, help="the two checkouts: before, after")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3, help="runs a side, alternating")
    args = parser.parse_args()
    data = data_set("demo")
    work = Path(tempfile.mkdtemp(prefix="demo-speed-"))
    found: dict[int, list[float]] = {0: [], 1: []}
    for rep in range(args.repeats):
        for side in (0, 1):
            tree = args.trees[side].resolve()
            found[side].append(samples_per_s(tree, data, work / f"{side}-{rep}", args.steps))
            print(f"{tree} run {rep + 1}: {found[side][-1]:.0f} samples/s", flush=True)
    before, after = (statistics.median(found[side]) for side in (0, 1))
    print(f"before {before:.0f} samples/s, after {after:.0f}: {after / before:.2f}x")
    print(json.dumps({"trees": [str(t) for t in args.trees], "runs": found, "ratio": after / before}))


if __name__ == "__main__":
    main()
