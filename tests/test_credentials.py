"""Credentials never written: one function decides what is one (contrastive.credentials); a config
that holds one is refused before anything is written, naming the key; a credential that comes from
the environment is used and appears in no file a run, its checkpoints, its export or wandb write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contrastive.credentials import REDACTED, find_secrets, redact, redact_location
from contrastive.data.sources import iter_tar_samples
from contrastive.modalities.image import Image

from conftest import run_cli, tiny_overrides
from servers import http_server

TOKEN = "tok-3f9a6c1e-never-written-anywhere"

SECRET = [
    ({"s": {"https": {"headers": {"Authorization": "Bearer abc"}}}}, "s.https.headers.Authorization"),
    ({"s": {"s3": {"client_kwargs": {"aws_secret_access_key": "abc"}}}}, "s.s3.client_kwargs.aws_secret_access_key"),
    ({"s": {"gcs": {"token": "abc"}}}, "s.gcs.token"),
    ({"d": "pipe:curl -s -u user:pass https://host/a.tar"}, "d"),
    ({"d": "pipe:curl -s --user=user:pass https://host/a.tar"}, "d"),
    ({"d": "pipe:curl -s -H 'Authorization: Bearer abc' https://host/a.tar"}, "d"),
    ({"d": "pipe:curl -s --header 'X-Api-Key: abc' https://host/a.tar"}, "d"),
    ({"d": "pipe:AWS_SECRET_ACCESS_KEY=abc aws s3 cp s3://b/a.tar -"}, "d"),
    ({"d": "pipe:tool --password abc s3://b/a.tar"}, "d"),
    ({"d": ["https://TOKEN@host/data/"]}, "d[0]"),
    ({"d": "https://user:pass@host/data/"}, "d"),
    ({"d": "https://host/a.tar?X-Amz-Signature=abc&X-Amz-Credential=x"}, "d"),
    ({"d": "https://host/a.tar?sv=2024&sig=abc"}, "d"),
    # combined and attached short options, cookies, bearer options, other tools' password options
    ({"d": "pipe:curl -sH 'Authorization: Bearer abc' https://host/a.tar"}, "d"),
    ({"d": 'pipe:curl -H"Authorization: Bearer abc" https://host/a.tar'}, "d"),
    ({"d": "pipe:curl -sSfu user:abc https://host/a.tar"}, "d"),
    ({"d": "pipe:curl -b 'sid=abc' https://host/a.tar"}, "d"),
    ({"d": "pipe:curl --oauth2-bearer abc https://host/a.tar"}, "d"),
    ({"d": "pipe:wget --http-password=abc -O - https://host/a.tar"}, "d"),
    ({"d": "pipe:curl --header='Cookie: session=abc' https://host/a.tar"}, "d"),
]
NOT_SECRET = [
    {"s": {"https": {"headers": {"Authorization": "Bearer ${oc.env:SHARD_TOKEN}"}}}},
    {"s": {"s3": {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "us-east-1"}}}},
    {"d": "pipe:curl -s -H 'Authorization: Bearer $SHARD_TOKEN' https://host/a.tar"},
    {"d": "pipe:curl -s -u $USER:$PASSWORD https://host/a.tar"},
    {"d": "pipe:cat /data/train-{000000..000003}.tar"},
    {"d": "s3://bucket/data/", "e": "https://host/data/?part=1"},
    {"modality": {"text": {"tokenizer": "open_clip", "context_length": 77}}, "trainer": {"record_keys": True}},
    # options named like a credential that take no value keep the location after them
    {"d": "pipe:aws s3 cp --no-sign-request s3://bucket/train/a.tar -"},
    {"d": "pipe:curl -s --anyauth https://host/a.tar"},
    {"d": "pipe:curl -b cookies.txt https://host/a.tar"},  # a cookie jar's file name
    {"d": 'pipe:curl --header="Authorization: Bearer ${oc.env:SHARD_TOKEN}" https://host/a.tar'},
]


@pytest.mark.parametrize("config,where", SECRET)
def test_each_kind_of_credential_is_found_at_its_key_path_and_redacted(config, where):
    assert [w for w, _ in find_secrets(config)] == [where]
    shown = json.dumps(redact(config))
    assert "abc" not in shown and "pass" not in shown.replace("password", "") and "TOKEN@" not in shown
    assert REDACTED in shown or "https://host/data/" in shown


@pytest.mark.parametrize("config", NOT_SECRET)
def test_references_and_plain_settings_are_no_credentials(config):
    assert not list(find_secrets(config))
    assert redact(config) == config  # what the environment fills in stays as written


def test_a_pipe_command_keeps_its_references_and_loses_its_literals():
    assert redact_location("pipe:curl -u $U:$P https://h/a.tar") == "pipe:curl -u $U:$P https://h/a.tar"
    assert redact_location("pipe:curl -u u:hunter2 https://h/a.tar") == f"pipe:curl -u u:{REDACTED} https://h/a.tar"
    shown = redact_location('pipe:curl -sH"Authorization: Bearer hunter2" https://h/a.tar')
    assert shown == f"pipe:curl -sH'Authorization: {REDACTED}' https://h/a.tar"
    assert redact_location("pipe:X_TOKEN=hunter2 tool --token=hunter2 s3://b/a.tar") == (
        f"pipe:X_TOKEN={REDACTED} tool --token={REDACTED} s3://b/a.tar"
    )


def test_log_lines_never_show_a_value_the_environment_brought_in(monkeypatch, caplog):
    import io
    import logging

    from contrastive.credentials import environment_secrets, seal_logs
    from contrastive.data.storage import ShardStream

    monkeypatch.setenv("SHARD_TOKEN", TOKEN)
    config = {"data": {"train": 'pipe:curl -H "Authorization: Bearer ${oc.env:SHARD_TOKEN}" https://h/a.tar'}}
    assert environment_secrets(config) == {TOKEN}
    assert environment_secrets({"d": "pipe:curl -H 'Authorization: Bearer $SHARD_TOKEN' https://h/a.tar"}) == {TOKEN}
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logging.getLogger().addHandler(handler)
    try:
        seal_logs({TOKEN})
        # a command that fails, quoting the resolved token: the retry's warning shows the command
        stream = ShardStream(
            f"pipe:false --header 'Authorization: Bearer {TOKEN}' https://h/a.tar", retries=1, backoff=0
        )
        with pytest.raises(OSError):
            stream.readinto(bytearray(64))
        try:
            raise RuntimeError(f"a library quoting it: {TOKEN}")
        except RuntimeError:
            logging.getLogger("contrastive").exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "retry 1 of 1" in out.getvalue() and "a library quoting it" in out.getvalue()
    assert TOKEN not in out.getvalue()


PLANTED = [
    (
        "+data.storage_options={https:{headers:{Authorization:'Bearer " + TOKEN + "'}}}",
        "data.storage_options.https.headers.Authorization",
    ),
    (
        f"data.storage_options.s3.client_kwargs.aws_secret_access_key={TOKEN}",
        "data.storage_options.s3.client_kwargs.aws_secret_access_key",
    ),
    (f"data.train='pipe:curl -s -u user:{TOKEN} https://shards.example/train/a.tar'", "data.train"),
    (f"data.train=https://{TOKEN}@shards.example/train/", "data.train"),
]


@pytest.mark.parametrize("override,key", PLANTED)
def test_a_credential_in_the_config_is_refused_before_anything_is_written(demo_data, tmp_path, override, key):
    run_dir = tmp_path / "run"
    proc = run_cli("contrastive-train", *tiny_overrides(demo_data, run_dir), override, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"holds a credential ({key}:" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert not run_dir.exists()  # not even Hydra's .hydra/ copies of the config and the overrides


def test_the_whole_dict_form_of_storage_options_composes(demo_data, tmp_path):
    from conftest import compose

    for form in (
        "data.storage_options={s3: {endpoint_url: 'http://127.0.0.1:9'}}",
        "+data.storage_options={s3: {endpoint_url: 'http://127.0.0.1:9'}}",
    ):
        assert compose(form).data.storage_options == {"s3": {"endpoint_url": "http://127.0.0.1:9"}}


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_a_credential_from_the_environment_is_used_and_never_written(demo_data, tmp_path):
    """Shards behind a server that wants a bearer token: training reads them through curl, which
    takes the token from $SHARD_TOKEN; evaluation reads over HTTP with a header resolved from
    ${oc.env:SHARD_TOKEN}. Nothing the run, its checkpoints, its export and wandb write holds it."""
    run_dir = tmp_path / "run"
    env = {"SHARD_TOKEN": TOKEN, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    with http_server(demo_data, token=TOKEN) as url:
        shards = f"{url}/train/train-{{000000..000003}}.tar"
        proc = run_cli(
            "contrastive-train",
            *tiny_overrides(demo_data, run_dir),
            # the token brought in by ${oc.env:...} inside the command: resolved, then redacted everywhere
            f"data.train='pipe:curl -s -f -H \"Authorization: Bearer ${{oc.env:SHARD_TOKEN}}\" {shards}'",
            "data.train_num_samples=160",
            f"data.eval={url}/heldout",
            "+data.storage_options={http:{headers:{Authorization:'Bearer ${oc.env:SHARD_TOKEN}'}}}",
            "logger.wandb=offline",
            "trainer.save_every=2",
            env=env,
        )
        run_cli("contrastive-export", str(run_dir), str(tmp_path / "exported"))
        # embeddings of the shards read with the token: $SHARD_TOKEN for curl's shell to fill in
        embedded = run_cli(
            "contrastive-embed",
            "embed",
            str(tmp_path / "exported"),
            "--data",
            f'pipe:curl -s -f -H "Authorization: Bearer $SHARD_TOKEN" {shards}',  # double quotes: expanded
            "--out",
            str(tmp_path / "emb"),
            env=env,
        )
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["eval/retrieval/image-audio/n"] == 40  # the held-out set, read with the token
    assert "data/bad/unreadable_shard" not in final  # every training shard came through curl
    assert (run_dir / "wandb").is_dir() and (run_dir / "checkpoints").is_dir() and (run_dir / "export").is_dir()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "${oc.env:SHARD_TOKEN}" in (run_dir / ".hydra" / "overrides.yaml").read_text()  # the reference, kept
    assert files_holding(run_dir, TOKEN) == [] and files_holding(tmp_path / "exported", TOKEN) == []
    assert TOKEN not in proc.stdout + proc.stderr
    embeddings = sorted((tmp_path / "emb").glob("*.image.npy"))
    assert len(embeddings) == 4  # each shard its own file, each holding its samples (read through curl)
    with_image = [
        sum(bool(set(Image.extensions) & set(s)) for s in iter_tar_samples(str(demo_data / f"train/train-{i:06d}.tar")))
        for i in range(4)
    ]
    assert [len(np.load(f)) for f in embeddings] == with_image
    assert files_holding(tmp_path / "emb", TOKEN) == [] and TOKEN not in embedded.stdout + embedded.stderr
