"""HTTP shards through a proxy that resets a third of the responses mid-body: a server that takes
`Range` is asked for the rest only (bytes served within 5% of the shards' size), one that does not is
restarted and skipped (the fallback); either way the same samples, in the same order, as without
faults, and each retry counted."""

from __future__ import annotations

import pytest
from servers import FaultProxy, http_server

from contrastive.data.shards import list_shards
from contrastive.data.sources import read_segments

EPOCHS = 3  # 12 shard reads: 4 of them reset


def read_all(url: str) -> tuple[list[str], int]:
    """(every sample key of the set at `url`, in order, EPOCHS times; the retries the reads took)."""
    shards = list_shards(url) * EPOCHS
    keys, retries = [], 0
    for slot in read_segments([(s, 0, s.samples, None) for s in shards]):
        assert "__error__" not in slot, slot
        keys.append(slot["__key__"])
        retries += slot.get("__retries__", 0)
    return keys, retries


@pytest.mark.parametrize("ranges", [True, False])
def test_a_reset_shard_resumes_where_it_broke(demo_data, ranges):
    needed = EPOCHS * sum(p.stat().st_size for p in (demo_data / "train").glob("*.tar"))
    expected, _ = read_all(str(demo_data / "train"))
    # a link of 20 MB/s, as the reader drains it (what aiohttp had buffered when the reset came is lost)
    with http_server(demo_data, ranges=ranges) as url, FaultProxy(url, reset_every=3, bandwidth=20e6) as proxy:
        keys, retries = read_all(f"{proxy.url}/train")
    assert keys == expected and len(keys) == EPOCHS * 160
    assert proxy.served["resets"] >= 3 and retries == proxy.served["resets"]
    ratio = proxy.served["bytes"] / needed
    if ranges:
        assert ratio <= 1.05, ratio
    else:  # restarted from byte 0: each reset costs what had been read of its shard again
        assert ratio > 1.1, ratio
