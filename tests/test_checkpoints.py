"""Checkpoints under stress: SIGTERM to a 2-rank run and resume=latest reproduce the uninterrupted
losses; a save that dies half-way leaves `latest` loadable; a run of non-finite steps stops with
a clear message and a checkpoint from before."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import torch

from conftest import BIN, REPO, read_jsonl, run_cli, script, tiny_overrides
from datasets import write_dataset
from dist_utils import run_ranks

TOTAL = 24


def launch(demo, run_dir, *extra) -> subprocess.Popen:
    args = tiny_overrides(
        demo,
        run_dir,
        f"trainer.max_steps={TOTAL}",
        "trainer.log_every=1",
        "data.eval=null",
        "export=false",
        "data.num_workers=1",
        "data.batch_size=8",
        "engine.zero_stage=2",
        *extra,
    )
    return subprocess.Popen(
        ["torchrun", "--standalone", "--nproc_per_node", "2", *script("contrastive-train"), *args],
        cwd=REPO,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def losses(run_dir):
    return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row}


def test_sigterm_then_resume_gives_the_uninterrupted_losses(demo_data, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    proc = launch(demo_data, whole)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]

    proc = launch(demo_data, split)
    metrics = split / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(read_jsonl(metrics)) >= 5):
        time.sleep(0.05)
    # As SLURM or a preempting scheduler does: SIGTERM to every process of the job step.
    ranks = [p for p in psutil.Process(proc.pid).children() if "contrastive-train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out
    stopped = int((split / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 5 <= stopped < TOTAL, "the run should have stopped early, at a step boundary"

    proc = launch(demo_data, split, "resume=latest")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert losses(split) == pytest.approx(losses(whole), abs=1e-6)


def _interrupted_save(tmp):
    """In a process group of one: a checkpoint at step 2, a save at step 3 that dies half-way."""
    from pathlib import Path

    from contrastive.builders import build_objective, build_optimizer
    from contrastive.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from contrastive.engine import Engine, deepspeed_config

    from datasets import tiny_modalities

    tmp = Path(tmp)

    def make():
        torch.manual_seed(0)
        objective = build_objective(tiny_modalities(("image", "text")), embed_dim=16)
        opt, _ = build_optimizer(
            objective, optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3), scheduler=None, total_steps=10
        )
        return objective, Engine(objective, opt, None, deepspeed_config(micro_batch_size=4, world_size=1))

    objective, engine = make()
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": torch.randint(1, 100, (4, 16)),
        "mask": {"image": torch.ones(4, dtype=torch.bool), "text": torch.ones(4, dtype=torch.bool)},
    }
    for _ in (1, 2):  # steps 1 and 2
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
    save_checkpoint(tmp, 2, engine, meta={"note": "good"}, rank_state={"rng": 1})
    at_two = {k: v.clone() for k, v in objective.state_dict().items()}
    loss, _ = engine(batch)
    engine.backward(loss)
    engine.step()

    import contrastive.checkpoint

    real_save = contrastive.checkpoint.save_engine

    def dies_half_way(engine, directory, tag, client_state):
        real_save(engine, directory, tag, client_state)
        for f in (Path(directory) / tag).iterdir():  # a torn write: files truncated, then the crash
            f.write_bytes(f.read_bytes()[:100])
        raise KeyboardInterrupt("killed while saving")

    contrastive.checkpoint.save_engine = dies_half_way
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp, 3, engine, meta={"note": "torn"}, rank_state={"rng": 1})
    latest = latest_checkpoint(tmp)
    fresh_objective, fresh = make()
    meta, mine = load_checkpoint(latest, fresh)
    same = all(torch.equal(fresh_objective.state_dict()[k], v) for k, v in at_two.items())
    return latest.name, meta["note"], mine["rng"], same


def test_interrupted_save_leaves_latest_loadable(tmp_path):
    ((name, note, rng, same),) = run_ranks(1, _interrupted_save, str(tmp_path))
    assert (name, note, rng) == ("step_00000002", "good", 1)
    assert same, "the weights loaded from `latest` are those saved at step 2"
    assert (tmp_path / "checkpoints" / ".partial" / "step_00000003").exists()  # the torn one, never pointed at


def test_nonfinite_steps_stop_the_run_with_a_checkpoint_from_before(tmp_path):
    from test_fourth_modality import vec_samples

    samples = vec_samples(64, 0)
    for s in samples[40:]:  # from the 6th batch of 8 on, every sample is poisoned
        s["vec"] = np.full(8, np.nan, dtype=np.float32).tobytes()
    data = write_dataset(tmp_path / "data", samples, shard_size=1000)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "contrastive-train",
        *tiny_overrides(
            tmp_path,
            run_dir,
            f"data.train={data}",
            "data.eval=null",
            "modalities=[vec,text]",
            "imports=[test_fourth_modality]",
            "data.batch_size=8",
            "data.shuffle_buffer=0",
            "trainer.max_steps=20",
            "trainer.log_every=1",
            "trainer.save_every=2",
            "trainer.max_bad_steps=3",
        ),
        env={"PYTHONPATH": str(REPO / "tests")},
        check=False,
    )
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite loss or gradient; stopping" in proc.stderr
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 0, 0, 1, 2]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000006"  # saved after the first skipped step: the weights of step 5
    from contrastive.ds_checkpoint import consolidated_state_dict

    assert all(torch.isfinite(v).all() for v in consolidated_state_dict(run_dir / "checkpoints" / latest).values())
