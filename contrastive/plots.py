"""PNG plots in the run directory: training curves, recall over training, a similarity matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _series(rows: Sequence[dict[str, Any]], prefix: str, suffix: str = "") -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and key.endswith(suffix) and isinstance(value, (int, float)):
                steps, values = out.setdefault(key[len(prefix) : len(key) - len(suffix) or None], ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (steps, values) in _series(rows, "loss/").items():
        ax_loss.plot(steps, values, label=name)
    total = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if total:
        ax_loss.plot(*zip(*total), label="total", color="black", linewidth=1)
    ax_loss.set(title="loss", xlabel="step")
    ax_loss.legend(fontsize=8)
    for name, (steps, values) in _series(rows, "logit_scale/").items():
        ax_scale.plot(steps, values, label=name)
    ax_scale.set(title="logit scale (1 / temperature)", xlabel="step")
    ax_scale.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eval_series(rows: Sequence[dict[str, Any]], task: str, suffix: str) -> dict[str, tuple[list, list]]:
    """`eval/[<set>/]<task>/<what><suffix>` series, named `[<set>: ]<what>`."""
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        for key, value in row.items():
            head, sep, rest = key.partition(f"{task}/")
            if key.startswith("eval/") and sep and key.endswith(suffix) and isinstance(value, (int, float)):
                eval_set = head[len("eval/") :].rstrip("/")
                name = rest[: len(rest) - len(suffix)]
                steps, values = out.setdefault(f"{eval_set}: {name}" if eval_set else name, ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def plot_recall(rows: Sequence[dict[str, Any]], path: Path) -> list[str]:
    """Retrieval R@1 and zero-shot top-1 over training, every eval set; returns the series' names."""
    fig, (ax_r, ax_zs) = plt.subplots(1, 2, figsize=(11, 4))
    names = []
    for ax, task, suffix, title in (
        (ax_r, "retrieval", "/R@1", "retrieval R@1"),
        (ax_zs, "zero_shot", "/acc", "zero-shot top-1"),
    ):
        for name, (steps, values) in _eval_series(rows, task, suffix).items():
            ax.plot(steps, values, marker="o", label=name)
            names.append(f"{task}: {name}")
        ax.set(title=f"{title} (held-out)", xlabel="step", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return names


def plot_similarity(
    a: torch.Tensor, b: torch.Tensor, labels: Sequence[Any], names: tuple[str, str], path: Path, n: int = 24
) -> None:
    """Cosine similarities of the first `n` samples holding both modalities; the diagonal is each
    sample's own partner."""
    a, b, labels = a[:n], b[:n], list(labels)[:n]
    sims = (a @ b.T).numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(sims, cmap="viridis")
    ticks = [str(lab) if lab is not None else "" for lab in labels]
    ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=6)
    ax.set_yticks(range(len(ticks)), ticks, fontsize=6)
    ax.set(xlabel=names[1], ylabel=names[0], title=f"{names[0]} x {names[1]} cosine similarity")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run_dir: Path, rows: Sequence[dict[str, Any]], embedded: dict[str, Any] | None = None) -> list[Path]:
    """curves.png, recall.png and (with eval embeddings) similarity.png in `run_dir`."""
    written = []
    if any("loss" in r for r in rows):
        plot_curves(rows, run_dir / "curves.png")
        written.append(run_dir / "curves.png")
    if any(k.startswith("eval/") for r in rows for k in r):
        plot_recall(rows, run_dir / "recall.png")
        written.append(run_dir / "recall.png")
    if embedded:
        names = list(embedded["embeddings"])
        for i, x in enumerate(names):
            for y in names[i + 1 :]:
                both = embedded["mask"][x] & embedded["mask"][y]
                if int(both.sum()) >= 2:
                    rows_both = both.nonzero().flatten().tolist()
                    plot_similarity(
                        embedded["embeddings"][x][both],
                        embedded["embeddings"][y][both],
                        [embedded["labels"][j] for j in rows_both],
                        (x, y),
                        run_dir / "similarity.png",
                    )
                    return written + [run_dir / "similarity.png"]
    return written
