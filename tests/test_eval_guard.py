"""Evaluation cannot end training: a run whose eval sets include a few-shot probe set (1000 classes
x 4 samples, which scikit-learn's stratified fifth cannot split) and a set whose shards disappear
after the run started finishes; the failing set is named in the log with its traceback, its metrics
are absent, the others are reported. contrastive-eval on the same sets exits non-zero."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from contrastive.evaluation.probe import validation_split

from conftest import REPO, read_jsonl, run_cli, tiny_overrides, tool
from datasets import png, write_dataset

CLASSES, SHOTS = 1000, 4


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory):
    """train: 1000 classes x 4 images; test: 1 image a class for the first 200 classes."""
    root = tmp_path_factory.mktemp("few_shot")
    train = [
        {"__key__": f"tr{c:04d}_{i}", "png": png(c * SHOTS + i, 8), "json": {"label": f"c{c}"}}
        for c in range(CLASSES)
        for i in range(SHOTS)
    ]
    test = [{"__key__": f"te{c:04d}", "png": png(10**6 + c, 8), "json": {"label": f"c{c}"}} for c in range(200)]
    return write_dataset(root / "train", train, shard_size=1000), write_dataset(root / "test", test, shard_size=100)


def test_the_probe_split_keeps_every_class_in_the_fit():
    labels = np.repeat(np.arange(CLASSES), SHOTS)
    fit, val = validation_split(labels, seed=0)
    assert set(labels[fit]) == set(range(CLASSES)) and len(val) == CLASSES  # one of four held out a class
    assert not set(fit) & set(val) and len(fit) + len(val) == len(labels)
    assert (validation_split(labels, seed=0)[1] == val).all()  # seeded


def test_a_failing_eval_set_is_named_and_training_finishes(demo_data, few_shot, tmp_path):
    train, test = few_shot
    gone = tmp_path / "gone"
    shutil.copytree(demo_data / "heldout", gone)
    run_dir = tmp_path / "run"
    args = tiny_overrides(
        demo_data,
        run_dir,
        "trainer.max_steps=8",
        f"+eval.sets.few={{path: {test}, task: linear_probe, probe_train: {train}}}",
        f"+eval.sets.gone={{path: {gone}}}",
        "eval.probe_cs=[1.0]",
    )
    proc = subprocess.Popen(
        [*tool("contrastive-train"), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and read_jsonl(metrics)):
        time.sleep(0.05)
    shutil.rmtree(gone)  # after the start: its shards are gone by the evaluation
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-4000:]
    assert "evaluation set eval.sets.gone failed; its metrics are left out" in log
    assert "Traceback" in log and "FAILED eval set gone" in log
    final = read_jsonl(metrics)[-1]
    assert not any(k.startswith("eval/gone/") for k in final)
    assert 0 <= final["eval/few/linear_probe/image/acc"] <= 1  # the 1000-class probe, reported
    assert final["eval/retrieval/image-audio/n"] == 40  # data.eval, reported

    # contrastive-eval on the same sets: the figures of the sets that work, and exit 1 for the one that fails
    out = tmp_path / "eval.json"
    proc = run_cli(
        "contrastive-eval",
        str(run_dir / "export"),
        "--set",
        f"missing={tmp_path / 'nowhere'}",
        "--data",
        str(demo_data / "heldout"),
        "--json",
        str(out),
        check=False,
    )
    assert proc.returncode == 1 and "FAILED eval set missing" in proc.stderr, proc.stderr[-2000:]
    reported = json.loads(out.read_text())
    assert {v for k, v in reported.items() if k.startswith("retrieval/") and k.endswith("/n")} == {40}
