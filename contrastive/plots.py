"""PNG plots in the run directory: training curves, recall over training, the shared space's geometry
over training, a 2-D view of the held-out embeddings, a similarity matrix."""

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


def plot_geometry(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Per pair over training: uniformity (per modality), alignment, the modality gap (training batches
    as lines; held-out sets, `eval/geometry/...`, as dots)."""
    panels = (
        ("uniformity", "uniformity (lower: spread over the sphere)"),
        ("alignment", "alignment (lower: partners closer)"),
        ("gap", "modality gap (centroid distance)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (what, title) in zip(axes, panels):
        for name, (steps, values) in _series(rows, f"geometry/{what}/").items():
            line = ax.plot(steps, values, label=name)[0]
            held = _series(rows, f"eval/geometry/{what}/").get(name)
            if held:
                ax.plot(*held, "o", color=line.get_color())
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_space(embedded: dict[str, Any], path: Path, n: int = 400) -> None:
    """The held-out embeddings of every modality in one 2-D view (PCA of them all together), coloured
    by modality, partners joined by faint lines: modalities in separate clouds is the gap, one tight
    blob a collapse."""
    names = list(embedded["embeddings"])
    kept = {m: embedded["mask"][m].nonzero().flatten()[:n] for m in names}
    stacked = torch.cat([embedded["embeddings"][m][kept[m]].float() for m in names])
    if len(stacked) < 3:
        return
    centred = stacked - stacked.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    points = centred @ v[:2].T
    fig, ax = plt.subplots(figsize=(7, 6))
    offset, where = 0, {}
    for m in names:
        count = len(kept[m])
        xy = points[offset : offset + count]
        where[m] = dict(zip(kept[m].tolist(), xy.tolist()))
        ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.6, label=f"{m} ({count})")
        offset += count
    if len(names) >= 2:
        a, b = names[0], names[1]
        for row in list(set(where[a]) & set(where[b]))[:100]:
            ax.plot(*zip(where[a][row], where[b][row]), color="grey", alpha=0.15, linewidth=0.5)
    ax.set(title="held-out embeddings, first two principal components", xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run_dir: Path, rows: Sequence[dict[str, Any]], embedded: dict[str, Any] | None = None) -> list[Path]:
    """curves.png, recall.png, geometry.png and (with eval embeddings) space.png and similarity.png in
    `run_dir`."""
    written = []
    if any("loss" in r for r in rows):
        plot_curves(rows, run_dir / "curves.png")
        written.append(run_dir / "curves.png")
    if any(k.startswith("eval/") for r in rows for k in r):
        plot_recall(rows, run_dir / "recall.png")
        written.append(run_dir / "recall.png")
    if any(k.startswith("geometry/") for r in rows for k in r):
        plot_geometry(rows, run_dir / "geometry.png")
        written.append(run_dir / "geometry.png")
    if embedded:
        plot_space(embedded, run_dir / "space.png")
        written.append(run_dir / "space.png")
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
