"""Does a teacher help? A teacher trained 3x longer on the demo, then students of the same towers
trained for the same (short) number of steps with and without `distill.teacher=<its export>`, 3 seeds
each; held-out zero-shot and retrieval, mean and spread.

    .venv/bin/python benchmarks/distill.py
    .venv/bin/python benchmarks/distill.py --teacher-steps 2400 --student-steps 300 --kind both

The last line is one JSON object with every run's figures and the means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import REPO, data_set, demo_figures, seed_row, table

FIGURES = {
    "image->text zero-shot": "eval/zero_shot/image->text/acc",
    "audio->text zero-shot": "eval/zero_shot/audio->text/acc",
    "audio->image label R@1": "eval/retrieval/audio->image/label_R@1",
    "text->image R@10": "eval/retrieval/text->image/R@10",
}


def train(data: Path, run_dir: Path, steps: int, seed: int, *extra: str) -> dict[str, float]:
    return demo_figures(data / "train", data / "heldout", run_dir, steps, seed, FIGURES, *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=2400)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kind", default="logits")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "distill")
    args = parser.parse_args()
    data = data_set("demo")
    teacher = args.out / "teacher"
    taught = train(data, teacher, args.teacher_steps, 100)
    print("teacher: " + ", ".join(f"{k} {v:.3f}" for k, v in taught.items()), flush=True)
    recipes = {"plain": [], "distilled": []}
    for seed in args.seeds:
        recipes["plain"].append(train(data, args.out / f"plain-{seed}", args.student_steps, seed, "export=false"))
        distill = [
            f"distill.teacher={teacher / 'export'}",
            f"distill.kind={args.kind}",
            f"distill.weight={args.weight}",
        ]
        recipes["distilled"].append(
            train(data, args.out / f"distilled-{seed}", args.student_steps, seed, "export=false", *distill)
        )
        for name, found in recipes.items():
            seed_row(name, seed, found[-1])
    summary = table(recipes, FIGURES, "recipe")
    print(
        json.dumps(
            {"teacher": taught, "runs": recipes, "summary": summary, "settings": vars(args) | {"out": str(args.out)}}
        )
    )


if __name__ == "__main__":
    main()
