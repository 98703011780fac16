"""Does adaptive pair balancing keep a scarce modality learning? The demo with audio in only ~30% of
the training samples (`data.modality_dropout.audio=0.7`), trained for the same steps with fixed pair
weights, `loss.balance=progress` and `loss.balance=gradnorm`, 3 seeds each; held-out audio->text
zero-shot, audio<->image label R@1 and image->text zero-shot, mean and spread over the seeds.

    .venv/bin/python benchmarks/balance.py                   # 9 runs of the quickstart's 800 steps
    .venv/bin/python benchmarks/balance.py --steps 300 --seeds 0 1

The last line is one JSON object with every run's figures and the means.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import REPO, data_set, table, train_rows

FIGURES = {
    "audio->text zero-shot": "eval/zero_shot/audio->text/acc",
    "audio->image label R@1": "eval/retrieval/audio->image/label_R@1",
    "image->audio label R@1": "eval/retrieval/image->audio/label_R@1",
    "image->text zero-shot": "eval/zero_shot/image->text/acc",
}


def train(data: Path, balance: str, seed: int, steps: int, out: Path) -> dict[str, float]:
    overrides = [
        "experiment=demo",
        f"data.train={data / 'train'}",
        f"data.eval={data / 'heldout'}",
        "data.modality_dropout={audio: 0.7}",
        f"loss.balance={balance}",
        f"trainer.seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.save_every=0",
        "export=false",
    ]
    rows = train_rows(overrides, out / f"{balance}-{seed}")
    final = rows[-1]
    present = [r["data/present/audio"] / r["data/slots"] for r in rows if "data/present/audio" in r][-1]
    return {**{name: final[key] for name, key in FIGURES.items()}, "audio present": present}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--balances", nargs="+", default=["none", "progress", "gradnorm"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "balance")
    args = parser.parse_args()
    data = data_set("demo")
    runs: dict[str, list[dict[str, float]]] = {b: [] for b in args.balances}
    for seed in args.seeds:  # seeds outer: a noisy machine spreads over every recipe alike
        for balance in args.balances:
            t0 = time.time()
            runs[balance].append(train(data, balance, seed, args.steps, args.out))
            print(
                f"{balance:9s} seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in runs[balance][-1].items())
                + f" ({time.time() - t0:.0f} s)",
                flush=True,
            )
    summary = table(runs, FIGURES, "balance")
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
