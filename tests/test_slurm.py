"""SLURM, against a real single-node cluster on localhost (slurmctld + slurmd + munge, started here):
contrastive-submit runs the tiny demo as a 2-task job to completion; a job signalled as SLURM does
before a time limit checkpoints, requeues itself, resumes from the checkpoint and, after a second
round of the same, finishes with every step trained once and the same samples as an uninterrupted
run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import REPO, read_jsonl, run_cli, script, tiny_overrides

CLUSTER = REPO / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None:
        subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True)
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip(
            "SLURM cannot be installed on this machine (no slurmctld/munged after apt-get); "
            "scripts/test.sh installs them where apt-get works"
        )
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (slurmd), and this test run is not root")
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(directory)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr + (directory / "slurmctld.log").read_text()[-2000:]
    env = {"SLURM_CONF": str(directory / "slurm.conf")}
    os.environ.update(env)
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(directory)])
    os.environ.pop("SLURM_CONF", None)


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def submit(run_dir, *overrides) -> str:
    proc = run_cli("contrastive-submit", *overrides, "launcher.tasks_per_node=2", "launcher.cpus_per_task=1")
    assert (run_dir / "job.sbatch").exists() and (run_dir / "job_config.yaml").exists()
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def finished(job: str) -> bool:
    return job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    proc = run_cli(
        "contrastive-submit",
        "--dry-run",
        "experiment=demo",
        "launcher=slurm_multinode",
        "launcher.nodes=3",
        "launcher.partition=gpu",
        "launcher.account=vision",
        "launcher.sbatch=['--qos=high']",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    script = proc.stdout
    for line in (
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
        'scontrol show hostnames "$SLURM_JOB_NODELIST"',
        "resume=latest",
    ):
        assert line in script
    assert not (tmp_path / "run").exists()


def test_submit_runs_the_demo_as_a_two_task_job(slurm, demo_data, tmp_path):
    run_dir = tmp_path / "run"
    # trainer.progress=true: the bar is asked for, but the job's stdout is a file, so it logs lines.
    # As many loader workers per rank as the node has CPUs: more than the job's 1 CPU a task.
    workers = os.cpu_count()
    overrides = ["trainer.max_steps=6", "trainer.progress=true", "trainer.log_every=2", f"data.num_workers={workers}"]
    job = submit(run_dir, *tiny_overrides(demo_data, run_dir), *overrides)
    wait_for(lambda: finished(job), 300, f"job {job} to finish")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert job_info(job)["JobState"] == "COMPLETED", log[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert "eval/zero_shot/image->text/acc" in rows[-1] and (run_dir / "export" / "model.safetensors").exists()
    assert len(re.findall(r"data.train: 160 samples in 4 shards, 2 ranks", log)) == 2  # two ranks, one job
    lines = re.findall(
        r"step (\d)/6 \(\d+%\) \| epoch \d \| loss [\d.]+ \(image-audio [\d.]+, image-text [\d.]+, "
        r"audio-text [\d.]+\) \| lr [\d.e+-]+ \| \d+ samples/s \| data wait \d+% \| MFU ~?[\d.]+% \| "
        r"ETA [\dhms]+",
        log,
    )
    assert lines == ["2", "4", "6"], log[-3000:]  # from rank 0 only, every log_every steps
    # the allocation, once (rank 0), and the warning that the workers lack CPUs, with what to set
    allocation = re.findall(
        r"allocation: 1 node x 2 rank\(s\) = 2 rank\(s\) \| GPUs per node: 0 visible, 0 used \| "
        rf"(\d+) CPU\(s\) per rank for {workers} loader worker\(s\) \| device cpu",
        log,
    )
    assert allocation == [str(os.cpu_count() // 2)], log[:3000]
    assert log.count(f"launcher.cpus_per_task={workers + 1}") == 1
    assert "\r" not in log  # no progress bar redraws in the file


def signal_and_wait_for_requeue(job: str, restarts: int) -> None:
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what --signal=USR1@120 sends
    wait_for(
        lambda: int(job_info(job).get("Restarts", 0)) == restarts and job_info(job)["JobState"] == "PENDING",
        120,
        f"job {job} to requeue itself",
    )
    # SLURM holds a requeued job for two minutes before it may start again; once the node has
    # finished with its first run (starting it earlier fails its launch: "credential revoked"), let
    # it start now.
    wait_for(
        lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() == "idle",
        120,
        "the node to finish with the job's previous run",
    )
    time.sleep(1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, demo_data, tmp_path):
    total = 40
    common = [
        "data.eval=null",
        "export=false",
        f"trainer.max_steps={total}",
        "trainer.log_every=1",
        "data.batch_size=8",
        "trainer.record_keys=true",
    ]
    run_dir = tmp_path / "run"
    job = submit(run_dir, *tiny_overrides(demo_data, run_dir), *common)
    metrics = run_dir / "metrics.jsonl"

    def steps_done():
        return max([r["step"] for r in read_jsonl(metrics) if "loss" in r], default=0) if metrics.exists() else 0

    wait_for(lambda: steps_done() >= 5, 240, "the job to train 5 steps")
    signal_and_wait_for_requeue(job, 1)
    first_stop = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    wait_for(lambda: steps_done() >= first_stop + 5, 240, "the requeued job to train 5 more steps")
    signal_and_wait_for_requeue(job, 2)
    second_stop = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    wait_for(lambda: finished(job), 300, f"job {job} to finish")

    log = (run_dir / f"slurm-{job}.out").read_text()
    assert job_info(job)["JobState"] == "COMPLETED", log[-3000:]
    assert [int(n) for n in re.findall(r"job \d+, start (\d+)", log)] == [1, 2, 3]
    assert log.count("requeued SLURM job") == 2
    assert f"resumed from {run_dir}/checkpoints/step_{first_stop:08d} at step {first_stop}" in log
    assert f"resumed from {run_dir}/checkpoints/step_{second_stop:08d} at step {second_stop}" in log
    assert 5 <= first_stop < second_stop < total
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{total:08d}"

    # Every step trained exactly once, on exactly the samples of an uninterrupted 2-rank run.
    reference = tmp_path / "reference"
    run_cli(
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        *script("contrastive-train"),
        *tiny_overrides(demo_data, reference),
        *common,
    )
    for r in range(2):
        got = read_jsonl(run_dir / "keys" / f"rank{r}.jsonl")
        want = read_jsonl(reference / "keys" / f"rank{r}.jsonl")
        assert [row["step"] for row in got] == list(range(1, total + 1))
        assert [row["keys"] for row in got] == [row["keys"] for row in want]
