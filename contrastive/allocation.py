"""What the job was given and how the ranks use it, checked at start (rank 0 prints one line):

    allocation: 2 nodes x 8 ranks = 16 ranks | GPUs per node: 8 visible, 8 used | 12 CPUs per rank
    for 8 loader workers | device cuda:0

and warns when GPUs are visible that no rank uses (`contrastive-train` started alone on a node of
8 GPUs trains on one) or when a rank has fewer CPUs than the loader workers it starts plus itself
(SLURM's default of one CPU a task, where the data wait hides behind "the GPU is slow").
CPUs are what `os.sched_getaffinity` allows, shared by the ranks of a node that see the same ones.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Sequence

import torch

from contrastive.distributed import DistInfo, gather_objects

log = logging.getLogger("contrastive")


@dataclass(frozen=True)
class RankReport:
    """What one rank sees: its host, the GPUs and CPUs it may use, and the GPU it trains on."""

    host: str
    rank: int
    device: str
    gpus: tuple[str, ...]  # identities (UUIDs) of the visible GPUs
    used_gpu: str | None
    cpus: frozenset[int]


def gpu_identity(index: int) -> str:
    """A GPU's identity across processes that number it differently (CUDA_VISIBLE_DEVICES)."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid else f"{props.name}#{getattr(props, 'pci_bus_id', index)}"


def this_rank(dist: DistInfo) -> RankReport:
    gpus = tuple(gpu_identity(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()
    used = gpu_identity(dist.device.index or 0) if dist.device.type == "cuda" else None
    cpus = (
        frozenset(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else frozenset(range(os.cpu_count() or 1))
    )
    return RankReport(
        host=socket.gethostname(), rank=dist.rank, device=str(dist.device), gpus=gpus, used_gpu=used, cpus=cpus
    )


@dataclass(frozen=True)
class Summary:
    line: str
    warnings: list[str]
    cpus_per_rank: dict[str, int]  # host -> CPUs each of its ranks may count on


def summarize(reports: Sequence[RankReport], *, num_workers: int) -> Summary:
    hosts: dict[str, list[RankReport]] = {}
    for report in sorted(reports, key=lambda r: r.rank):
        hosts.setdefault(report.host, []).append(report)
    warnings, cpus_per_rank, visible, used = [], {}, {}, {}
    for host, ranks in hosts.items():
        visible[host] = set().union(*(r.gpus for r in ranks))
        used[host] = {r.used_gpu for r in ranks if r.used_gpu is not None}
        idle = len(visible[host] - used[host])
        if idle:
            warnings.append(
                f"{host}: {idle} of its {len(visible[host])} visible GPUs are used by no rank ({len(ranks)} rank(s) "
                f"there): start one rank per GPU (`torchrun --nproc_per_node gpu $(which contrastive-train) ...`, "
                f"or contrastive-submit launcher.gpus_per_node={len(visible[host])})"
            )
        cpus = set().union(*(r.cpus for r in ranks))
        cpus_per_rank[host] = max(1, len(cpus) // len(ranks))
        # Fewer CPUs than loader workers starve the loader. A rank's own process shares them: on
        # a 2-CPU machine the demo's 2 workers keep ahead of its step (benchmarks/loader.py).
        if cpus_per_rank[host] < num_workers:
            warnings.append(
                f"{host}: {len(cpus)} CPU(s) (os.sched_getaffinity) for {len(ranks)} rank(s), {cpus_per_rank[host]} "
                f"each, but each rank runs {num_workers} loader worker(s) and itself: the data wait will grow. Set "
                f"launcher.cpus_per_task={num_workers + 1} (SLURM; its default is what the loader needs) or give "
                f"fewer workers (data.num_workers={cpus_per_rank[host]})"
            )
    per_node = sorted({len(ranks) for ranks in hosts.values()})
    nodes = f"{len(hosts)} node{'s' if len(hosts) > 1 else ''} x {'/'.join(map(str, per_node))} rank(s)"
    gpus = " ".join(sorted({f"{len(visible[h])} visible, {len(used[h])} used" for h in hosts}))
    line = (
        f"allocation: {nodes} = {len(reports)} rank(s) | GPUs per node: {gpus} | "
        f"{min(cpus_per_rank.values())} CPU(s) per rank for {num_workers} loader worker(s) | "
        f"device {reports[0].device if reports else '?'}"
    )
    return Summary(line=line, warnings=warnings, cpus_per_rank=cpus_per_rank)


def check_allocation(dist: DistInfo, *, num_workers: int) -> int:
    """Collective: every rank reports; rank 0 logs the allocation line and its warnings. Returns the
    CPUs this rank may count on (for its thread count)."""
    mine = this_rank(dist)
    reports = gather_objects(mine)
    summary = summarize(reports, num_workers=num_workers)
    if dist.is_main:
        log.info(summary.line)
        for warning in summary.warnings:
            log.warning(warning)
    return summary.cpus_per_rank[mine.host]
