"""SLURM batch scripts: the launcher settings (`launcher.*`), the allocation they ask for, and the
script they render.

`contrastive-submit` composes the training config, resolves the allocation (`resolve_allocation`:
one rank per GPU, CPUs for every rank's loader workers), renders `slurm/train.sbatch` (package data
in a wheel, see contrastive.layout) and submits it; `contrastive-train` itself runs wherever it is started.

Ranks follow GPUs: each rank trains on one GPU, so a node asking for 8 GPUs runs 8 tasks unless
told otherwise, and a task count that would leave GPUs idle (or make two ranks share one, which
NCCL refuses) is refused with the reason, before anything is submitted.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from contrastive.errors import ConfigError
from contrastive.layout import SLURM_DIR

TEMPLATE = SLURM_DIR / "train.sbatch"

# sbatch options that launcher keys own: given through launcher.sbatch they would contradict the keys
OWNED_OPTIONS = {
    "--ntasks-per-node": "tasks_per_node",
    "--gpus-per-node": "gpus_per_node",
    "--gpus-per-task": "gpus_per_task",
    "--cpus-per-task": "cpus_per_task",
    "--nodes": "nodes",
}


@dataclass
class LauncherConfig:
    """`launcher.*`: read by contrastive-submit (sbatch options); contrastive-train ignores it."""

    nodes: int = 1
    tasks_per_node: int = 0  # ranks per node; 0: one per GPU (gpus_per_node / gpus_per_task), or 1 on CPUs
    gpus_per_node: int = 0  # 0: no --gpus-per-node line (CPU ranks, or GPUs asked per task)
    gpus_per_task: int = 0  # 1: --gpus-per-task=1, each task sees only its own GPU; 0: no such line
    cpus_per_task: int = 0  # 0: what the loader needs, data.num_workers + 1
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"
    job_name: str = "contrastive"
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit: checkpoint, requeue, resume
    sbatch: List[str] = field(default_factory=list)  # extra sbatch options, e.g. ["--qos=high"]
    setup: List[str] = field(default_factory=list)  # shell lines run before srun, e.g. ["module load cuda"]


@dataclass(frozen=True)
class Allocation:
    """What one job asks SLURM for, resolved from the launcher settings and the loader's workers."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int  # 0: none asked per node
    gpus_per_task: int  # 0: none asked per task
    cpus_per_task: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node


def resolve_allocation(launcher: LauncherConfig, *, num_workers: int) -> Allocation:
    """The allocation `launcher` asks for, one rank per GPU. Raises ConfigError naming the keys when
    the settings would leave GPUs idle, make ranks share a GPU, or contradict each other."""
    for option in launcher.sbatch:
        name = option.split("=", 1)[0].strip()
        if name in OWNED_OPTIONS:
            raise ConfigError(
                f"launcher.sbatch: {option!r} sets what launcher.{OWNED_OPTIONS[name]} sets; "
                f"use launcher.{OWNED_OPTIONS[name]} instead, so the ranks follow it"
            )
    if launcher.nodes < 1:
        raise ConfigError(f"launcher.nodes={launcher.nodes}: at least one node")
    gpus, per_task, tasks = launcher.gpus_per_node, launcher.gpus_per_task, launcher.tasks_per_node
    if per_task > 1:
        raise ConfigError(
            f"launcher.gpus_per_task={per_task}: a rank trains on one GPU, so {per_task - 1} of "
            f"each task's GPUs would idle; use launcher.gpus_per_task=1 (one rank per GPU)"
        )
    if gpus:
        if tasks == 0:
            tasks = gpus
        elif tasks < gpus:
            raise ConfigError(
                f"launcher.tasks_per_node={tasks} with launcher.gpus_per_node={gpus}: a rank trains on one GPU, so "
                f"{gpus - tasks} GPUs of every node would idle; leave launcher.tasks_per_node unset (one rank "
                f"per GPU) or set launcher.gpus_per_node={tasks}"
            )
        elif tasks > gpus:
            raise ConfigError(
                f"launcher.tasks_per_node={tasks} with launcher.gpus_per_node={gpus}: {tasks} ranks cannot share "
                f"{gpus} GPUs (NCCL refuses two ranks on one GPU); leave launcher.tasks_per_node unset or set "
                f"launcher.gpus_per_node={tasks}"
            )
    else:
        tasks = tasks or 1
    if launcher.cpus_per_task and launcher.cpus_per_task < 1:
        raise ConfigError(f"launcher.cpus_per_task={launcher.cpus_per_task}: at least one CPU")
    return Allocation(
        nodes=launcher.nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus,
        gpus_per_task=per_task,
        cpus_per_task=launcher.cpus_per_task or num_workers + 1,
    )


def render_sbatch(launcher: LauncherConfig, allocation: Allocation, *, run_dir: Path, script: Path, python: str) -> str:
    """The batch script that trains from `<run_dir>/job_config.yaml` with `python`."""
    optional = []
    if allocation.gpus_per_node:
        optional.append(f"#SBATCH --gpus-per-node={allocation.gpus_per_node}")
    if allocation.gpus_per_task:
        optional.append(f"#SBATCH --gpus-per-task={allocation.gpus_per_task}")
    optional.append(f"#SBATCH --cpus-per-task={allocation.cpus_per_task}")
    if launcher.partition:
        optional.append(f"#SBATCH --partition={launcher.partition}")
    if launcher.account:
        optional.append(f"#SBATCH --account={launcher.account}")
    optional += [f"#SBATCH {option}" for option in launcher.sbatch]
    return TEMPLATE.read_text().format(
        script=script,
        job_name=launcher.job_name,
        nodes=allocation.nodes,
        tasks_per_node=allocation.tasks_per_node,
        time=launcher.time,
        run_dir=shlex.quote(str(run_dir)),
        signal_seconds=launcher.signal_seconds,
        optional_lines="\n".join(optional),
        setup="\n".join(launcher.setup),
        python=shlex.quote(python),
    )
