"""contrastive-embed: per-modality embeddings of a dataset, split over ranks, resumable after a kill,
and nearest-neighbour search over them."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from contrastive.builders import build_objective
from contrastive.embed import load_embeddings
from contrastive.export import export_model

from conftest import REPO, run_cli, script, tool
from datasets import sample, tiny_modalities, write_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    export_model(build_objective(tiny_modalities(), embed_dim=16).model, tmp / "export")
    data = write_dataset(tmp / "data", [sample(i, audio=i % 4 != 0) for i in range(400)], shard_size=20)
    return tmp, tmp / "export", data


def embed_args(model, data, out, *extra):
    return ["embed", str(model), "--data", str(data), "--out", str(out), "--batch-size", "8", *extra]


def test_interrupted_embedding_resumes_without_recomputing(setup):
    tmp, model, data = setup
    out = tmp / "killed"
    proc = subprocess.Popen(
        [*tool("contrastive-embed"), *embed_args(model, data, out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.done"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done")}
    assert 2 <= len(finished) < 20, "the kill should land between the first and the last shard"

    rerun = run_cli("contrastive-embed", *embed_args(model, data, out))
    assert f"embedded {20 - len(finished)} shards, skipped {len(finished)} finished ones" in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.done") if p.name in finished} == finished

    whole = tmp / "whole"
    run_cli("contrastive-embed", *embed_args(model, data, whole))
    for m in ("image", "audio", "text"):
        got, keys, labels = load_embeddings(out, m)
        want, want_keys, _ = load_embeddings(whole, m)
        assert keys == want_keys and np.allclose(got, want, atol=1e-6)
    assert len(load_embeddings(out, "audio")[1]) == 300 and len(load_embeddings(out, "image")[1]) == 400


def test_ranks_split_the_shards_and_search_finds_neighbours(setup):
    tmp, model, data = setup
    out = tmp / "ranks"
    proc = run_cli(
        "torchrun", "--standalone", "--nproc_per_node", "2", *script("contrastive-embed"), *embed_args(model, data, out)
    )
    assert "rank 0: embedded 10 shards" in proc.stdout and "rank 1: embedded 10 shards" in proc.stdout
    emb, keys, _ = load_embeddings(out, "text")
    assert emb.shape == (400, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)

    found = run_cli(
        "contrastive-embed",
        "search",
        "--index",
        str(out),
        "--query",
        "sample number 17",
        "--modality",
        "text",
        "-k",
        "3",
    )
    lines = found.stdout.strip().splitlines()
    assert lines[0].startswith("text 'sample number 17' -> nearest text of 400")
    assert "s00017" in lines[1]  # its own caption is the nearest text


def test_shards_read_by_a_pipe_ending_in_a_dash_embed_to_files_of_their_own(setup):
    """`pipe:aws s3 cp s3://b/{a,b}.tar -` ends in `-`: each shard is named by the .tar it reads."""
    tmp, model, data = setup
    out = tmp / "piped"
    run_cli("contrastive-embed", *embed_args(model, f"pipe:cat {data}/part-{{000000..000002}}.tar | cat -", out))
    assert sorted(p.name for p in out.glob("*.image.npy")) == [f"part-00000{i}.image.npy" for i in range(3)]
    vectors, keys, _ = load_embeddings(out, "image")
    assert len(keys) == len(set(keys)) == 60 and vectors.shape == (60, 16)
