"""The private doors in contrastive/adapters.py (the only ones the package uses: tests/test_house.py)
still do what they are there for with the versions installed, so an upgrade that changes one fails
here, loudly, not in a user's run."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from contrastive import adapters


def test_a_loaders_workers_stop_at_once():
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.zeros(1)

    before = set(multiprocessing.active_children())
    iterator = iter(torch.utils.data.DataLoader(Endless(), batch_size=None, num_workers=1))
    next(iterator)
    workers = set(multiprocessing.active_children()) - before
    assert workers
    adapters.stop_loader_workers(iterator)
    assert not any(w.is_alive() for w in workers)
    adapters.stop_loader_workers(iter(torch.utils.data.DataLoader([1, 2], batch_size=None)))  # no workers: nothing


def test_deepspeed_skips_the_shared_memory_allreduce_it_is_told_cannot_build(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__  # the op DeepSpeed probes by that name
    adapters.skip_cpu_shared_memory_allreduce()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None  # nothing compiled


@pytest.mark.parametrize("ranges", [True, False])
def test_an_http_streams_status_says_whether_the_range_was_honoured(demo_data, ranges):
    import fsspec

    from servers import http_server

    with http_server(demo_data, ranges=ranges) as url:
        fs = fsspec.filesystem("http")
        with fs.open(f"{url}/train/sizes.json", "rb", block_size=0, headers={"Range": "bytes=5-"}) as f:
            status, headers = adapters.http_status(f)
            body = f.read()
    whole = (demo_data / "train" / "sizes.json").read_bytes()
    if ranges:
        assert status == 206 and headers["Content-Range"].startswith("bytes 5-") and body == whole[5:]
    else:
        assert status == 200 and body == whole
