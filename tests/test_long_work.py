"""Rank 0's long work between collectives, on 2 real ranks (torchrun, gloo) with checkpoints on S3
(moto) behind a proxy: an upload slower than the process group's timeout does not end the run (the
other rank waits in short heartbeats, not in one collective), and an upload that fails stops every
rank at once with the error in each rank's log, long before the timeout."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import BIN, REPO, script, tiny_overrides
from servers import FaultProxy, s3_env, s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        import s3fs

        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
        fs.mkdir("ckpt")
        yield endpoint, fs


def two_ranks(demo, run_dir: Path, logs: Path, endpoint: str, *extra: str) -> tuple[int, float]:
    """(exit status, seconds) of a 2-rank run whose checkpoints go to s3://ckpt/<run> through `endpoint`;
    each rank's output in logs/<...>/<rank>/std{out,err}.log."""
    args = tiny_overrides(
        demo,
        run_dir,
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "data.num_workers=1",
        "data.batch_size=8",
        "export=false",
        f"trainer.checkpoint_dir=s3://ckpt/{run_dir.name}",
        *extra,
    )
    env = {**os.environ, **s3_env(endpoint), "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "--redirects", "3", "--log-dir", str(logs)]
        + [*script("contrastive-train"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, time.monotonic() - started


def rank_logs(logs: Path) -> dict[int, str]:
    """Each rank's output, stdout then stderr."""
    out: dict[int, str] = {}
    for path in sorted(logs.rglob("std*.log"), key=lambda p: p.name, reverse=True):
        out[int(path.parent.name)] = out.get(int(path.parent.name), "") + path.read_text()
    return out


def when(log: str, text: str) -> float:
    """The time (s) of the first log line holding `text` ("[2026-12-01 01:24:20,307][...] - ...")."""
    line = next(line for line in log.splitlines() if text in line)
    stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def test_an_upload_slower_than_the_collective_timeout_does_not_end_the_run(demo_data, s3, tmp_path):
    endpoint, fs = s3
    timeout = 8
    with FaultProxy(endpoint, latency=2.5) as proxy:  # each request 2.5 s: a checkpoint's upload takes ~13 s
        code, seconds = two_ranks(
            demo_data, tmp_path / "slow", tmp_path / "logs", proxy.url, f"trainer.dist_timeout={timeout}"
        )
    logs = rank_logs(tmp_path / "logs")
    assert code == 0, logs
    # the first upload took longer than any collective may wait, and training went on meanwhile
    saved, uploaded = when(logs[0], "step 2/4"), when(logs[0], "checkpoint step_00000002 uploaded to s3://ckpt/slow")
    assert uploaded - saved > timeout, (saved, uploaded)
    assert saved < when(logs[0], "step 3/4") < uploaded
    assert fs.cat_file("ckpt/slow/latest").decode().strip() == "step_00000004"


def test_a_failing_upload_stops_every_rank_at_once_naming_it(demo_data, s3, tmp_path):
    endpoint, _ = s3
    timeout = 300
    with FaultProxy(endpoint, deny=r"^PUT /ckpt/failing/step_") as proxy:  # the probe passes, the upload not
        code, seconds = two_ranks(
            demo_data, tmp_path / "failing", tmp_path / "logs", proxy.url, f"trainer.dist_timeout={timeout}"
        )
    assert proxy.served["denied"] >= 1
    logs = rank_logs(tmp_path / "logs")
    assert code != 0
    assert seconds < timeout / 2  # no rank sat out the process group's timeout
    for rank in (0, 1):
        assert "the upload of the previous checkpoint to s3://ckpt/failing failed on rank 0" in logs[rank], logs[rank][
            -3000:
        ]
        assert "AccessDenied" in logs[rank] or "Forbidden" in logs[rank] or "PermissionError" in logs[rank]


def test_a_rejected_remote_latest_stops_every_rank_at_once_naming_it(demo_data, s3, tmp_path):
    endpoint, fs = s3
    fs.pipe_file("ckpt/pointing-away/latest", b"../../elsewhere\n")  # a tag no checkpoint can have
    timeout = 300
    code, seconds = two_ranks(
        demo_data,
        tmp_path / "pointing-away",
        tmp_path / "logs",
        endpoint,
        f"trainer.dist_timeout={timeout}",
        "resume=latest",
    )
    logs = rank_logs(tmp_path / "logs")
    assert code != 0 and seconds < timeout / 2  # no rank waited for the process group's timeout
    for rank in (0, 1):
        assert "reading s3://ckpt/pointing-away/latest failed on rank 0" in logs[rank], logs[rank][-3000:]
