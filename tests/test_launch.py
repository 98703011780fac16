"""Every GPU it asks for: ranks follow GPUs in the rendered batch script (or the combination is
refused naming its keys), each rank picks its device from what it sees, and the allocation check
at start names idle GPUs and starved loader workers."""

from __future__ import annotations

import pytest
import torch

from contrastive.allocation import RankReport, summarize
from contrastive.cli import submit
from contrastive.distributed import choose_device, slurm_tasks_on_node


def dry_run(capsys, tmp_path, *overrides) -> tuple[int, str, str]:
    code = submit.main(["--dry-run", "experiment=demo", f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gpus_per_node_renders_one_task_per_gpu(capsys, tmp_path):
    code, script, _ = dry_run(capsys, tmp_path, "launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=8")
    assert code == 0
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=3",
    ):  # the demo's 2 loader workers + the rank itself
        assert line in script.splitlines()
    code, script, _ = dry_run(
        capsys, tmp_path, "launcher.gpus_per_node=4", "data.num_workers=8", "launcher.cpus_per_task=16"
    )
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --cpus-per-task=16" in script


def test_gpus_per_task_renders_it(capsys, tmp_path):
    code, script, _ = dry_run(capsys, tmp_path, "launcher.gpus_per_task=1", "launcher.tasks_per_node=8")
    lines = script.splitlines()
    assert code == 0 and "#SBATCH --gpus-per-task=1" in lines and "#SBATCH --ntasks-per-node=8" in lines
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in lines)


def test_cpu_ranks_default_to_one_task(capsys, tmp_path):
    code, script, _ = dry_run(capsys, tmp_path)
    assert code == 0 and "#SBATCH --ntasks-per-node=1" in script and "gpus" not in script


@pytest.mark.parametrize(
    "overrides,named",
    [
        (
            ["launcher.gpus_per_node=8", "launcher.tasks_per_node=4"],
            ["launcher.tasks_per_node=4", "launcher.gpus_per_node=8", "4 GPUs of every node would idle"],
        ),
        (["launcher.gpus_per_node=8", "launcher.tasks_per_node=16"], ["launcher.tasks_per_node=16", "NCCL"]),
        (["launcher.gpus_per_task=2"], ["launcher.gpus_per_task=2"]),
        (["launcher.sbatch=['--gpus-per-task=1']"], ["launcher.sbatch", "launcher.gpus_per_task"]),
    ],
)
def test_a_combination_that_wastes_or_shares_gpus_is_refused_naming_the_keys(capsys, tmp_path, overrides, named):
    code, script, err = dry_run(capsys, tmp_path, *overrides)
    assert code == 2 and not script
    for text in named:
        assert text in err


def test_device_choice():
    def choose(requested="auto", *, local_rank, local_world_size, visible, env=None):
        return choose_device(
            requested, local_rank=local_rank, local_world_size=local_world_size, visible_gpus=visible, visible_env=env
        )

    # CPU only
    assert choose(local_rank=1, local_world_size=2, visible=0) == torch.device("cpu")
    assert choose("cpu", local_rank=0, local_world_size=1, visible=8) == torch.device("cpu")
    # one visible GPU per task (--gpus-per-task=1): each task's own, numbered 0
    assert choose(local_rank=5, local_world_size=8, visible=1, env="5") == torch.device("cuda", 0)
    # all GPUs visible: the local rank's
    assert choose(local_rank=5, local_world_size=8, visible=8) == torch.device("cuda", 5)
    # fewer visible GPUs than local ranks: a clear error
    with pytest.raises(
        RuntimeError, match=r"local rank 3 of 4 on this node sees 2 GPUs \(CUDA_VISIBLE_DEVICES='0,1'\)"
    ):
        choose(local_rank=3, local_world_size=4, visible=2, env="0,1")
    with pytest.raises(RuntimeError, match="trainer.device=cuda, but this process sees no GPU"):
        choose("cuda", local_rank=0, local_world_size=1, visible=0)


def test_slurm_tasks_per_node_format():
    assert slurm_tasks_on_node("8(x2)", 1) == 8
    assert slurm_tasks_on_node("4(x3),2", 3) == 2 and slurm_tasks_on_node("2,1", 0) == 2


def report(rank, host="node1", gpus=(), used=None, cpus=range(8)):
    return RankReport(
        host=host,
        rank=rank,
        device=f"cuda:{rank}" if used else "cpu",
        gpus=tuple(gpus),
        used_gpu=used,
        cpus=frozenset(cpus),
    )


def test_allocation_line_and_idle_gpus():
    gpus = [f"GPU-{i}" for i in range(8)]
    alone = summarize([report(0, gpus=gpus, used="GPU-0", cpus=range(32))], num_workers=8)
    assert alone.line.startswith("allocation: 1 node x 1 rank(s) = 1 rank(s) | GPUs per node: 8 visible, 1 used")
    assert len(alone.warnings) == 1 and "7 of its 8 visible GPUs are used by no rank" in alone.warnings[0]
    # --gpus-per-task=1: each rank sees only its own GPU; together they use all of them
    full = summarize(
        [
            report(r, host=h, gpus=[f"{h}-{r}"], used=f"{h}-{r}", cpus=range(r * 9, r * 9 + 9))
            for h in ("a", "b")
            for r in range(8)
        ],
        num_workers=8,
    )
    assert full.line.startswith(
        "allocation: 2 nodes x 8 rank(s) = 16 rank(s) | GPUs per node: 8 visible, 8 used | "
        "9 CPU(s) per rank for 8 loader worker(s)"
    )
    assert not full.warnings


def test_too_few_cpus_for_the_loader_workers_is_said_with_what_to_set():
    starved = summarize([report(0, cpus=[0, 1]), report(1, cpus=[0, 1])], num_workers=2)
    assert starved.cpus_per_rank == {"node1": 1}
    (warning,) = starved.warnings
    assert "2 CPU(s) (os.sched_getaffinity) for 2 rank(s), 1 each" in warning
    assert "launcher.cpus_per_task=3" in warning and "data.num_workers=1" in warning
    # as many CPUs as workers (the quickstart's 2 on a 2-CPU machine): nothing to say
    assert not summarize([report(0, cpus=[0, 1])], num_workers=2).warnings


# Rank 11 of 2 nodes x 8 GPUs (node 1, local rank 3), as each launcher describes it.
NODES_2_X_8 = {
    "deepspeed": {
        "RANK": "11",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "16",
        "LOCAL_SIZE": "8",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    },
    "torchrun": {
        "RANK": "11",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_RANK": "1",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    },
    "slurm": {
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_NTASKS": "16",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    },
    "slurm --gpus-per-task=1": {  # each task sees its own GPU only, numbered 0
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_NTASKS": "16",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "CUDA_VISIBLE_DEVICES": "3",
    },
    "openmpi": {
        "OMPI_COMM_WORLD_RANK": "11",
        "OMPI_COMM_WORLD_LOCAL_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    },
}


@pytest.mark.parametrize("launcher", sorted(NODES_2_X_8))
def test_every_launchers_variables_on_two_nodes_of_eight_gpus(launcher):
    from contrastive.distributed import launcher_env

    env = NODES_2_X_8[launcher]
    rank, local_rank, world, per_node = launcher_env(env)
    assert (rank, local_rank, world, per_node) == (11, 3, 16, 8)
    visible = env["CUDA_VISIBLE_DEVICES"]
    device = choose_device(
        "auto",
        local_rank=local_rank,
        local_world_size=per_node,
        visible_gpus=len(visible.split(",")),
        visible_env=visible,
    )
    assert device == torch.device("cuda", 0 if launcher.endswith("--gpus-per-task=1") else 3)
