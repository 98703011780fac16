"""What the benchmark scripts share: the repository's data sets (made on first use) and the summary
of several seeds' figures."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def data_set(name: str = "demo") -> Path:
    """`data/<name>` (`demo` or `emoji`), made by `contrastive-data <name>` if it is not there yet."""
    data = REPO / "data" / name
    if not (data / "heldout" / "sizes.json").exists():
        subprocess.run([str(BIN / "contrastive-data"), name, str(data)], check=True)
    return data


def over_seeds(found: list[dict[str, float]], names) -> dict[str, dict[str, float]]:
    """{"mean": ..., "half_range": ...} of each named figure over the seeds' runs."""
    return {
        "mean": {n: statistics.mean(r[n] for r in found) for n in names},
        "half_range": {n: (max(r[n] for r in found) - min(r[n] for r in found)) / 2 for n in names},
    }


def cells(summary: dict[str, dict[str, float]], names, width: int) -> str:
    """The figures as `mean ± half range` columns, each `width` characters wide."""
    return "".join(f"{summary['mean'][n]:>{width - 7}.1%} ±{summary['half_range'][n]:>5.1%}" for n in names)


def table(runs: dict[str, list[dict[str, float]]], names, title: str, width: int = 26) -> dict[str, dict]:
    """Prints each recipe's figures over its seeds (a header, then `mean ± half range` a recipe);
    returns {recipe: over_seeds(...)}."""
    first = max(len(title), *(len(r) for r in runs)) + 1
    print(f"\n{title:{first}s}" + "".join(f"{n:>{width}s}" for n in names))
    summary = {}
    for name, found in runs.items():
        summary[name] = over_seeds(found, names)
        print(f"{name:{first}s}" + cells(summary[name], names, width))
    return summary


def seed_row(name: str, seed: int, found: dict[str, float]) -> None:
    print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()), flush=True)


def demo_figures(train: Path, heldout: Path, run_dir: Path, steps: int, seed: int, figures, *extra: str) -> dict:
    """The demo recipe on `train` for `steps`, evaluated on `heldout` at its end: {name: metric} of
    `figures` ({name: metrics key})."""
    overrides = [
        "experiment=demo",
        f"data.train={train}",
        f"data.eval={heldout}",
        f"trainer.seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.save_every=0",
        *extra,
    ]
    final = train_rows(overrides, run_dir)[-1]
    return {name: final[key] for name, key in figures.items()}


def train_rows_from(tree: Path, args: list[str], run_dir: Path, env: dict | None = None) -> list[dict]:
    """contrastive-train from the checkout `tree` (its package first on the path, this interpreter),
    writing to `run_dir`; its metrics rows."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "contrastive.cli.train", *args], cwd=tree, capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"contrastive-train from {tree} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(overrides: list[str], run_dir: Path, threads: int | None = None) -> list[dict]:
    """`contrastive-train <overrides>` in a fresh `run_dir` (metrics.jsonl appends: a rerun must not
    read the last one's rows); its metrics rows. `threads` also sets OMP_NUM_THREADS."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    args = [*overrides, "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([str(BIN / "contrastive-train"), *args], capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"contrastive-train {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
