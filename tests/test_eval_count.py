"""Evaluation sets are counted once: a 4-shard set in CLIP_benchmark's layout (nshards.txt, no
sizes.json) served over HTTP and evaluated twice by 2 ranks is read once per evaluation, each shard
by one rank, and never before the first step; `pipe:` and `file://` locations work as eval sets."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from contrastive.data.shards import write_shard
from contrastive.data.sources import iter_tar_samples

from conftest import BIN, REPO, run_cli, script, tiny_overrides
from servers import FaultProxy, http_server

SHARDS = 4


@pytest.fixture(scope="module")
def bench(demo_data, tmp_path_factory):
    """The held-out demo samples in CLIP_benchmark's layout: <root>/test/{0..3}.tar + nshards.txt."""
    root = tmp_path_factory.mktemp("bench")
    samples = [s for shard in sorted((demo_data / "heldout").glob("*.tar")) for s in iter_tar_samples(str(shard))]
    (root / "test").mkdir()
    per = len(samples) // SHARDS
    for i in range(SHARDS):
        write_shard(
            root / "test" / f"{i}.tar",
            ({k: v for k, v in s.items() if k != "__shard__"} for s in samples[i * per : (i + 1) * per]),
        )
    (root / "test" / "nshards.txt").write_text(f"{SHARDS}\n")
    return root


def test_a_set_without_sizes_is_read_once_per_evaluation_by_two_ranks(demo_data, bench, tmp_path):
    run_dir = tmp_path / "run"
    with http_server(bench.parent) as url, FaultProxy(url) as proxy:
        args = tiny_overrides(
            demo_data,
            run_dir,
            "data.eval=null",
            f"+eval.sets.bench={{path: {proxy.url}/{bench.name}}}",
            "trainer.max_steps=4",
            "trainer.eval_every=2",
            "data.num_workers=1",
            "data.batch_size=8",
        )
        proc = subprocess.run(
            ["torchrun", "--standalone", "--nproc_per_node", "2", *script("contrastive-train"), *args],
            cwd=REPO,
            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shard_gets = {path: n for path, n in proxy.gets.items() if path.endswith(".tar")}
    assert shard_gets == {f"/{bench.name}/test/{i}.tar": 2 for i in range(SHARDS)}  # two evaluations, once each
    final = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/bench/" in line]
    assert len(final) == 2 and '"eval/bench/retrieval/image-audio/n": 40' in final[-1]

    # the same set through a pipe: and a file:// URL (contrastive-eval on the run's export)
    shards = f"{bench}/test/{{0..{SHARDS - 1}}}.tar"
    proc = run_cli(
        "contrastive-eval",
        str(run_dir / "export"),
        "--set",
        f"piped=pipe:cat {shards}",
        "--set",
        f"local=file://{bench}",
        "--json",
        str(tmp_path / "eval.json"),
    )
    reported = json.loads((tmp_path / "eval.json").read_text())
    for name in ("piped", "local"):
        assert {v for k, v in reported.items() if k.startswith(f"{name}/retrieval/") and k.endswith("/n")} == {40}
