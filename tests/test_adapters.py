"""The package reaches no private name of another module or dependency, except the few in
contrastive/adapters.py, and each of those still does what it is there for with the versions
installed (so an upgrade that changes one fails here, loudly, not in a user's run)."""

from __future__ import annotations

import ast
import multiprocessing
from pathlib import Path

import pytest
import torch

from contrastive import adapters

from conftest import REPO

# the dunders that are part of Python's own data model, not anyone's private parts
DATA_MODEL = {
    "__file__",
    "__name__",
    "__dict__",
    "__wrapped__",
    "__class__",
    "__module__",
    "__qualname__",
    "__doc__",
    "__path__",
    "__version__",
    "__init__",
    "__call__",
    "__fspath__",
}


def private_uses(path: Path) -> list[str]:
    """`x._name` (x not self or cls), `getattr(x, "_name")`, and imports of `_name`s, in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr not in DATA_MODEL:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            owner, name = (node.args + [None, None])[:2]
            mine = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
            if (
                not mine
                and isinstance(name, ast.Constant)
                and str(name.value).startswith("_")
                and name.value not in DATA_MODEL
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: getattr {name.value}")
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names = [a.name for a in node.names] + (node.module or "").split(".")
            found += [f"{path.relative_to(REPO)}:{node.lineno}: import {n}" for n in names if n.startswith("_")]
    return found


def test_no_private_names_outside_the_adapter_module():
    files = [*(REPO / "contrastive").rglob("*.py"), *(REPO / "data_tools").rglob("*.py")]
    found = [hit for path in files if path.name != "adapters.py" for hit in private_uses(path)]
    assert not found, "private names used outside contrastive/adapters.py:\n" + "\n".join(found)
    assert private_uses(REPO / "contrastive" / "adapters.py")  # the check sees them where they are


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
