"""Patch dropout in the audio tower (FLIP's token dropping on spectrogram patches): training samples/s
of the tower, forward + backward + AdamW step at the same batch, with `modality.audio.patch_dropout`
0 and 0.5 (and 0.75), measured in one process, alternating; FLOPs per sample as the trainer counts
them (over the tokens kept).

    .venv/bin/python benchmarks/patch_dropout.py                       # the demo's audio tower
    .venv/bin/python benchmarks/patch_dropout.py --model small --batch 32

The last line is one JSON object: each rate's samples/s, its ratio to the unmasked tower's, FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def tower(model: str, rate: float, seed: int = 0):
    from contrastive.builders import build_modalities
    from contrastive.flops import training_flops_per_sample
    from contrastive.model import ContrastiveModel

    from conftest import compose

    cfg = compose("experiment=demo", f"model={model}", f"modality.audio.patch_dropout={rate}")
    from omegaconf import OmegaConf

    mods = build_modalities(["audio", "text"], OmegaConf.to_container(cfg.modality, resolve=True))
    torch.manual_seed(seed)
    m = ContrastiveModel({"audio": mods["audio"]}, cfg.model.embed_dim)
    return m, mods["audio"], training_flops_per_sample(m)["audio"]


def step_seconds(model, modality, batch: int, steps: int) -> float:
    x = modality.empty()[None].repeat(batch, 1, 1, 1) + torch.randn(batch, *modality.empty().shape) * 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + 2):  # two to warm up
        t0 = time.perf_counter()
        model.encode("audio", x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tower sizes: tiny (the demo's), small, base")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    args = parser.parse_args()
    towers = {rate: tower(args.model, rate) for rate in args.rates}
    seconds: dict[float, list[float]] = {rate: [] for rate in args.rates}
    for _ in range(args.rounds):  # alternating, so that the machine's noise falls on each alike
        for rate, (model, modality, _) in towers.items():
            seconds[rate].append(step_seconds(model, modality, args.batch, args.steps))
    base = args.batch / median(seconds[args.rates[0]])
    out = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "rates": {}}
    for rate, (_, _, flops) in towers.items():
        sps = args.batch / median(seconds[rate])
        out["rates"][str(rate)] = {"samples_per_s": sps, "over_unmasked": sps / base, "gflops_per_sample": flops / 1e9}
        print(f"patch_dropout {rate:.2f}: {sps:8.1f} samples/s ({sps / base:.2f}x), {flops / 1e9:.3f} GFLOP/sample")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
