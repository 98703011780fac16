"""SLURM batch scripts: the launcher settings (`launcher.*`) and the script they render.

`contrastive-submit` composes the training config, renders `templates/train.sbatch` (package data)
with these settings and submits it; `contrastive-train` itself runs wherever it is started.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

TEMPLATE = Path(__file__).resolve().parent / "templates" / "train.sbatch"


@dataclass
class LauncherConfig:
    """`launcher.*`: read by contrastive-submit (sbatch options); contrastive-train ignores it."""

    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU
    gpus_per_node: int = 0  # 0: no --gpus-per-node line (CPU ranks)
    cpus_per_task: int = 0  # 0: SLURM's default
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"
    job_name: str = "contrastive"
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit: checkpoint, requeue, resume
    sbatch: List[str] = field(default_factory=list)  # extra sbatch options, e.g. ["--qos=high"]
    setup: List[str] = field(default_factory=list)  # shell lines run before srun, e.g. ["module load cuda"]


def render_sbatch(launcher: LauncherConfig, *, run_dir: Path, script: Path, python: str) -> str:
    """The batch script that trains from `<run_dir>/job_config.yaml` with `python`."""
    optional = []
    if launcher.gpus_per_node:
        optional.append(f"#SBATCH --gpus-per-node={launcher.gpus_per_node}")
    if launcher.cpus_per_task:
        optional.append(f"#SBATCH --cpus-per-task={launcher.cpus_per_task}")
    if launcher.partition:
        optional.append(f"#SBATCH --partition={launcher.partition}")
    if launcher.account:
        optional.append(f"#SBATCH --account={launcher.account}")
    optional += [f"#SBATCH {option}" for option in launcher.sbatch]
    return TEMPLATE.read_text().format(
        script=script,
        job_name=launcher.job_name,
        nodes=launcher.nodes,
        tasks_per_node=launcher.tasks_per_node,
        time=launcher.time,
        run_dir=shlex.quote(str(run_dir)),
        signal_seconds=launcher.signal_seconds,
        optional_lines="\n".join(optional),
        setup="\n".join(launcher.setup),
        python=shlex.quote(python),
    )
