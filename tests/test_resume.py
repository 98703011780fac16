"""Exact mid-epoch resume through the real CLI: the sample keys (and losses) of N steps, stop, resume,
M more steps equal those of N + M steps uninterrupted; with 2 DataLoader workers on one process, and
with 2 gloo ranks under torchrun (2 workers each). The runs cross an epoch boundary."""

from __future__ import annotations

import shutil

import pytest

from conftest import read_jsonl, run_cli, script, tiny_overrides


def keys_by_rank(run_dir, ranks):
    return {r: [row["keys"] for row in read_jsonl(run_dir / "keys" / f"rank{r}.jsonl")] for r in range(ranks)}


def losses(run_dir):
    return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row}


def keyed_overrides(demo, run_dir, *extra):
    """The tiny demo with every step's sample keys recorded, 2 workers, batches of 16."""
    return tiny_overrides(
        demo,
        run_dir,
        "data.eval=null",
        "export=false",
        "trainer.record_keys=true",
        "trainer.log_every=1",
        "data.batch_size=16",
        "data.num_workers=2",
        "data.shuffle_buffer=32",
        *extra,
    )


def train(launcher, demo, run_dir, *extra, check=True):
    """keyed_overrides on one process ("single") or two ranks ("torchrun")."""
    args = keyed_overrides(demo, run_dir, *extra)
    if launcher == "torchrun":
        return run_cli("torchrun", "--standalone", "--nproc_per_node", "2", *script("contrastive-train"), *args)
    return run_cli("contrastive-train", *args, check=check)


# 160 training samples; batches of 16 slots. One rank, 2 workers: 80 samples a worker, 5 batches
# each, 10 steps an epoch. Two ranks x 2 workers: 40 a worker, 2 full batches each (the 8 left of
# each worker are dropped: no partial batch), 4 steps an epoch.
@pytest.mark.parametrize("launcher,ranks,n,m,epoch_steps", [("single", 1, 7, 8, 10), ("torchrun", 2, 3, 4, 4)])
def test_stop_and_resume_sees_exactly_the_same_samples(demo_data, tmp_path, launcher, ranks, n, m, epoch_steps):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(launcher, demo_data, whole, f"trainer.max_steps={n + m}")
    train(launcher, demo_data, split, f"trainer.max_steps={n + m}", f"trainer.stop_at_step={n}")
    assert (split / "checkpoints" / "latest").read_text().strip() == f"step_{n:08d}"
    train(launcher, demo_data, split, f"trainer.max_steps={n + m}", "resume=latest")

    expected, got = keys_by_rank(whole, ranks), keys_by_rank(split, ranks)
    for r in range(ranks):
        assert len(got[r]) == n + m
        assert got[r] == expected[r], f"rank {r}: resumed run saw other samples"
    assert n + m > epoch_steps, "the run should cross an epoch boundary"
    first_epoch = [k for r in range(ranks) for step in expected[r][:epoch_steps] for k in step]
    trained = epoch_steps * ranks * 16
    assert len(first_epoch) == len(set(first_epoch)) == trained  # every sample once at most, on one rank
    assert 160 - trained < ranks * 2 * 16  # but each worker's last partial batch
    assert losses(split) == pytest.approx(losses(whole), abs=1e-6)


@pytest.fixture(scope="module")
def stopped_mid_epoch(demo_data, tmp_path_factory):
    """(the demo set, a run stopped at step 3 of an epoch of 10)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train("single", demo_data, run, "trainer.max_steps=8", "trainer.stop_at_step=3")
    return demo_data, run


@pytest.mark.parametrize(
    "changed,named",
    [
        ("trainer.seed=1", "trainer.seed=1, but the checkpoint stopped mid-epoch with trainer.seed=0"),
        (
            "data.shuffle_buffer=64",
            "data.shuffle_buffer=64, but the checkpoint stopped mid-epoch with data.shuffle_buffer=32",
        ),
        ("trainer.accumulate=2", "this run has 32 (1 x 16 x 2)"),
    ],
)
def test_a_resume_that_cannot_replay_the_epoch_is_refused_naming_the_setting(
    stopped_mid_epoch, tmp_path, changed, named
):
    demo_data, run = stopped_mid_epoch[0], tmp_path / "run"
    shutil.copytree(stopped_mid_epoch[1], run)
    refused = train("single", demo_data, run, "trainer.max_steps=8", "resume=latest", changed, check=False)
    assert refused.returncode != 0 and named in refused.stderr, refused.stderr[-2000:]
    assert not (run / "checkpoints" / "step_00000004").exists()  # refused before any step


def test_a_resume_after_a_crash_logs_each_step_once(demo_data, tmp_path):
    """Killed after step 6 with the last checkpoint at 3: the rows of steps 4-6 (metrics and sample
    keys) are written again on resume, not twice; a new run in the same directory starts a new log."""
    run = tmp_path / "run"
    train("single", demo_data, run, "trainer.max_steps=6", "trainer.save_every=3")
    before_keys, before_losses = keys_by_rank(run, 1)[0], losses(run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # as if killed before step 6's checkpoint
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    train("single", demo_data, run, "trainer.max_steps=6", "trainer.save_every=3", "resume=latest")
    steps = [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert keys_by_rank(run, 1)[0] == before_keys and losses(run) == pytest.approx(before_losses, abs=1e-6)

    shutil.rmtree(run / "checkpoints")
    train("single", demo_data, run, "trainer.max_steps=2")  # a new run, same directory
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "loss" in row] == [1, 2]
    assert [row["step"] for row in read_jsonl(run / "metrics.1.jsonl") if "loss" in row] == [1, 2, 3, 4, 5, 6]
