"""`trainer.threads=0` (measured in the first steps: contrastive.threads) against each fixed thread count,
on this machine, in one run of this script: the demo (image, audio, text; 2 loader workers) and a
small-image image-text run; samples/s over the steps after the choice is made.

    .venv/bin/python benchmarks/threads.py
    .venv/bin/python benchmarks/threads.py --steps 120 --repeats 2

The last line is one JSON object: per setting and run, samples/s, and auto's ratio to the best fixed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from statistics import mean

from common import REPO, data_set, train_rows

RUNS = {
    "demo (image, audio, text)": [],
    "image-text, small images": ["modalities=[image,text]", "data.batch_size=128"],
}
SKIP = 30  # steps before timing: the warm-up and auto's trials (3 + 2 x 8)


def samples_per_s(data: Path, threads: int, extra: list[str], steps: int, out: Path) -> float:
    overrides = [
        "experiment=demo",
        f"data.train={data / 'train'}",
        "data.eval=null",
        f"trainer.threads={threads}",
        f"trainer.max_steps={steps}",
        "trainer.log_every=1",
        "trainer.save_every=0",
        "trainer.eval_every=0",
        "export=false",
        *extra,
    ]
    rows = train_rows(overrides, out / f"t{threads}")
    return mean(r["samples_per_s"] for r in rows if "samples_per_s" in r and r["step"] > SKIP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "threads")
    args = parser.parse_args()
    data = data_set("demo")
    cpus = len(os.sched_getaffinity(0))
    fixed = list(range(1, cpus + 1))
    result = {"cpus": cpus, "runs": {}}
    for name, extra in RUNS.items():
        found: dict[str, list[float]] = {str(t): [] for t in fixed + [0]}
        for _ in range(args.repeats):  # alternating: the machine's noise falls on each alike
            for t in fixed + [0]:
                found[str(t)].append(samples_per_s(data, t, extra, args.steps, args.out / name.split()[0].strip(",")))
        means = {t: mean(v) for t, v in found.items()}
        best = max(means[str(t)] for t in fixed)
        result["runs"][name] = {"samples_per_s": means, "auto_over_best_fixed": means["0"] / best}
        cells = ", ".join(f"threads={t}: {v:.0f}" for t, v in means.items())
        print(f"{name}: {cells} samples/s; auto / best fixed = {means['0'] / best:.3f}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
