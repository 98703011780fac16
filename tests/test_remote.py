"""Data and checkpoints where they live, through real servers on 127.0.0.1 (see servers.py): Python's
HTTP server, moto's S3-compatible server spoken to by s3fs, webdataset's pipe: opener, and a fault
proxy that resets connections mid-shard and answers 503. Training over each gives the local losses;
a run stopped mid-epoch with its checkpoints on S3 resumes in an empty directory with the same
samples and losses as the uninterrupted run, which itself read through the faults."""

from __future__ import annotations

import json
import shutil

import pytest
from test_e2e import PINNED_LOSSES
from test_resume import keyed_overrides

from contrastive.checkpoint import RemoteCheckpoints
from contrastive.data.shards import DataError, list_shards
from contrastive.data.sources import read_segments
from contrastive.data.storage import StorageError, check_no_secrets, redact

from conftest import read_jsonl, run_cli, tiny_overrides
from servers import FaultProxy, gcs_env, gcs_server, http_server, s3_env, s3_server, upload

SECRET = "never-written-anywhere-0123456789"  # the S3 secret key: moto takes any


@pytest.fixture(scope="module")
def http(demo_data):
    with http_server(demo_data) as url:
        yield url


@pytest.fixture(scope="module")
def s3(demo_data):
    """(endpoint, the environment a client needs): the demo set at s3://demo/{train,heldout}."""
    with s3_server() as endpoint:
        upload(demo_data / "train", "s3://demo/train", endpoint)
        upload(demo_data / "heldout", "s3://demo/heldout", endpoint)
        yield endpoint, {**s3_env(endpoint), "AWS_SECRET_ACCESS_KEY": SECRET}


def losses(run_dir):
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


def keys(run_dir):
    return [row["keys"] for row in read_jsonl(run_dir / "keys" / "rank0.jsonl")]


@pytest.mark.parametrize("where", ["http", "s3", "pipe"])
def test_training_on_remote_shards_gives_the_local_losses(where, demo_data, http, s3, tmp_path):
    env, data, extra = {}, None, []
    if where == "http":
        data = f"{http}/train"
        extra = [f"data.eval={http}/heldout"]  # evaluation reads over HTTP too
    elif where == "s3":
        data, env = "s3://demo/train", s3[1]
    else:  # a shell command per shard, webdataset's convention; no sizes.json: open_clip's count
        data = f"'pipe:cat {demo_data}/train/train-{{000000..000003}}.tar'"
        extra = ["data.train_num_samples=160"]
    run_dir = tmp_path / "run"
    run_cli("contrastive-train", *tiny_overrides(demo_data, run_dir, f"data.train={data}", *extra), env=env)
    assert losses(run_dir) == pytest.approx(PINNED_LOSSES, abs=1e-5)
    if where == "http":
        final = read_jsonl(run_dir / "metrics.jsonl")[-1]
        assert final["eval/retrieval/image-audio/n"] == 40  # the held-out set, read over HTTP


def resume_overrides(demo, run_dir, data, *extra):
    return keyed_overrides(demo, run_dir, f"data.train={data}", "trainer.max_steps=8", *extra)


def test_stop_on_s3_resume_elsewhere_through_faults(demo_data, http, s3, tmp_path):
    """Uninterrupted: 8 steps over HTTP through the fault proxy. Interrupted: 4 steps on the S3 copy,
    checkpoints uploaded to S3; then, in a new empty run directory (another node), resume=latest
    fetches them and trains 4 more over HTTP. The same samples, the same losses."""
    endpoint, env = s3
    whole, first, second = tmp_path / "whole", tmp_path / "first", tmp_path / "second"
    with FaultProxy(http, error_every=5, reset_every=3) as proxy:
        run_cli("contrastive-train", *resume_overrides(demo_data, whole, f"{proxy.url}/train"))
    assert proxy.served["resets"] >= 2 and proxy.served["errors_503"] >= 1, proxy.served
    final = [row for row in read_jsonl(whole / "metrics.jsonl") if "data/slots" in row][-1]
    assert final.get("data/retries", 0) >= 1, final  # the faults that hit the loader's reads, counted
    assert final["data/samples"] == 8 * 16 and not any(k.startswith("data/bad") for k in final)  # nothing lost

    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret=SECRET, endpoint_url=endpoint)
    fs.mkdir("checkpoints")
    ckpt = ["trainer.checkpoint_dir=s3://checkpoints/run", "trainer.save_every=2"]
    run_cli(
        "contrastive-train",
        *resume_overrides(demo_data, first, "s3://demo/train", *ckpt, "trainer.stop_at_step=4"),
        env=env,
    )
    assert keys(first) == keys(whole)[:4]
    shutil.rmtree(first)  # the node is gone; only what was uploaded is left
    run_cli("contrastive-train", *resume_overrides(demo_data, second, f"{http}/train", *ckpt, "resume=latest"), env=env)

    assert fs.cat_file("checkpoints/run/latest").decode().strip() == "step_00000008"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("checkpoints/run")) == [
        "latest",
        "step_00000006",
        "step_00000008",
    ]
    assert json.loads(fs.cat_file("checkpoints/run/step_00000008/contrastive.json"))["step"] == 8

    assert keys(second) == keys(whole)[4:]  # the resumed run trained exactly the rest
    assert losses(second) == pytest.approx(losses(whole)[4:], abs=1e-6)
    for path in second.rglob("*"):  # credentials in no log, metric or config
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".log", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path

    # an export written straight to object storage
    fs.mkdir("models")
    run_cli("contrastive-export", str(second), "s3://models/demo", env=env)
    assert {"model.safetensors", "config.json"} <= {p.rsplit("/", 1)[-1] for p in fs.ls("models/demo")}


def test_a_wrong_bucket_stops_the_run_before_the_first_step(demo_data, s3, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "contrastive-train",
        *tiny_overrides(demo_data, run_dir, "data.train=s3://no-such-bucket/train", "data.eval=null"),
        env=s3[1],
        check=False,
    )
    assert proc.returncode != 0 and "s3://no-such-bucket/train" in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "metrics.jsonl").exists()


def test_missing_places_and_secrets_are_named(http, s3, monkeypatch):
    for key, value in s3[1].items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageError, match="trainer.checkpoint_dir: cannot write to s3://no-such-bucket/run"):
        RemoteCheckpoints("s3://no-such-bucket/run").check()
    with pytest.raises(DataError, match="/nowhere"):
        list_shards(f"{http}/nowhere")
    with pytest.raises(DataError, match="/missing-000"):
        list_shards(f"{http}/train/missing-{{000..001}}.tar")
    with pytest.raises(StorageError, match="holds a credential") as e:
        check_no_secrets("s3://user:hunter2@bucket/data", "data.train")
    assert "hunter2" not in str(e.value)
    assert redact("https://host/d/x.tar?X-Amz-Signature=abc") == "https://host/d/x.tar?X-Amz-Signature=<redacted>"
    # a storage option that is a credential is refused with the config (tests/test_credentials.py);
    # configure_storage takes resolved options, where one can only have come from the environment


def test_sizes_written_once_for_remote_shards(demo_data, s3, tmp_path):
    """Shards without sizes.json on S3: `contrastive-data stats --write-sizes` counts them once and
    writes it beside them; verify reads them there too."""
    endpoint, env = s3
    bare = tmp_path / "bare"
    shutil.copytree(demo_data / "heldout", bare)
    (bare / "sizes.json").unlink()
    upload(bare, "s3://demo/bare", endpoint)
    proc = run_cli("contrastive-data", "stats", "s3://demo/bare", "--write-sizes", env=env)
    assert "40 samples in 1 shards: wrote s3://demo/bare/sizes.json" in proc.stdout, proc.stdout
    proc = run_cli("contrastive-data", "verify", "s3://demo/bare", env=env)
    assert proc.stdout.strip().endswith("OK"), proc.stdout


def test_gcs_shards_read_as_the_local_ones(demo_data, monkeypatch):
    """gs:// through gcsfs, against a Cloud Storage emulator: the shard list and every sample's bytes,
    read by the loader's own reader (streamed, read ahead), equal the local copy's."""
    with gcs_server() as endpoint:
        for key, value in gcs_env(endpoint).items():
            monkeypatch.setenv(key, value)
        upload(demo_data / "heldout", "gs://demo/heldout", endpoint)
        remote, local = list_shards("gs://demo/heldout"), list_shards(demo_data / "heldout")
        assert [(s.name, s.samples) for s in remote] == [(s.name, s.samples) for s in local]
        assert remote[0].path == "gs://demo/heldout/heldout-000000.tar"

        def samples(shards):
            return [
                {k: v for k, v in s.items() if k != "__retries__"} for s in read_segments([(shards[0], 0, 360, None)])
            ]

        assert samples(remote) == samples(local) and len(samples(local)) == 360
