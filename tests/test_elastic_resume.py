"""Resume on another allocation through the real CLI: 2 gloo ranks (ZeRO-2) stopped mid-epoch resume
on 1 rank (the global batch kept with accumulation), which stops mid-epoch again and resumes on 2.
Every sample of the interrupted epoch is trained exactly once, and the optimizer's moments are those
of the checkpoint (read here from its partition files), not fresh ones."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_resume import train as train_keys

from conftest import read_jsonl


def train(demo, run_dir, ranks: int, *extra, check=True):
    launcher = "torchrun" if ranks == 2 else "single"
    zero2 = ("engine.zero_stage=2", "trainer.max_steps=7", "resume=latest")
    return train_keys(launcher, demo, run_dir, *zero2, *extra, check=check)


def saved_moments(checkpoint) -> dict[str, float]:
    """|exp_avg| and |exp_avg_sq| over every rank's ZeRO partition file, and the step count."""
    squares, steps = {"exp_avg": 0.0, "exp_avg_sq": 0.0}, set()
    for path in checkpoint.glob("*optim_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for group in state["base_optimizer_state"]["state"].values():
            steps.add(int(group["step"]))
            for key in squares:
                squares[key] += float(group[key].double().square().sum())
    assert len(steps) == 1
    return {**{k: math.sqrt(v) for k, v in squares.items()}, "step": steps.pop()}


def loaded_moments(log: str) -> dict[str, float]:
    found = re.search(r"optimizer moments: \|exp_avg\| (\S+), \|exp_avg_sq\| (\S+), step (\d+)", log)
    assert found, log[-3000:]
    return {"exp_avg": float(found[1]), "exp_avg_sq": float(found[2]), "step": int(found[3])}


def test_two_ranks_to_one_and_back_each_sample_once_optimizer_kept(demo_data, tmp_path):
    run = tmp_path / "run"
    # 160 samples. 2 ranks x 2 workers x 16: 3 batches a worker, 6 steps an epoch; stop after 2.
    train(demo_data, run, 2, "trainer.stop_at_step=2")
    at_2 = saved_moments(run / "checkpoints" / "step_00000002")

    # 1 rank keeps the global batch of 32 only with 2 batches a step: anything else is refused
    refused = train(demo_data, run, 1, "trainer.stop_at_step=3", check=False)
    assert refused.returncode != 0 and "global batch of 32" in refused.stderr
    assert "data.batch_size=16 trainer.accumulate=2" in refused.stderr, refused.stderr[-2000:]

    one = train(demo_data, run, 1, "trainer.accumulate=2", "trainer.stop_at_step=3")
    log = one.stdout + one.stderr
    assert "resume on another layout" in log and "-> {'world_size': 1" in log
    got = loaded_moments(log)
    assert got["step"] == at_2["step"] == 2
    assert got["exp_avg"] == pytest.approx(at_2["exp_avg"], rel=1e-5) and at_2["exp_avg"] > 0
    assert got["exp_avg_sq"] == pytest.approx(at_2["exp_avg_sq"], rel=1e-5)
    at_3 = saved_moments(run / "checkpoints" / "step_00000003")  # one rank's single partition

    two = train(demo_data, run, 2)
    got = loaded_moments(two.stdout + two.stderr)
    assert got["step"] == 3 and got["exp_avg"] == pytest.approx(at_3["exp_avg"], rel=1e-5)
    assert got["exp_avg_sq"] == pytest.approx(at_3["exp_avg_sq"], rel=1e-5)

    by_step: dict[int, list[str]] = {}
    for rank in (0, 1):
        for row in read_jsonl(run / "keys" / f"rank{rank}.jsonl"):
            by_step.setdefault(row["step"], []).extend(row["keys"])
    assert sorted(by_step) == list(range(1, 8))
    # epoch 0: steps 1-2 on 2 ranks (64 samples), step 3 on 1 rank (2 x 16), then its rest, 64
    # samples, on 2 ranks x 2 workers: one batch a worker, steps 4-5. Then epoch 1 from step 6.
    epoch0 = [k for step in range(1, 6) for k in by_step[step]]
    assert len(epoch0) == len(set(epoch0)) == 160, "each sample of the interrupted epoch exactly once"
    assert [len(by_step[s]) for s in range(1, 8)] == [32] * 7
    assert set(by_step[6]) <= set(epoch0)  # a new epoch
