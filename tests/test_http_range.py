"""HTTP shards through a proxy that resets a third of the responses mid-body: a server that takes
`Range` is asked for the rest only (bytes served within 5% of the shards' size), one that does not is
restarted and skipped (the fallback); either way the same samples, in the same order, as without
faults, and each retry counted."""

from __future__ import annotations

import pytest

from contrastive.data.shards import list_shards
from contrastive.data.sources import read_segments

from servers import FaultProxy, http_server

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


def samples_of(path) -> list[dict]:
    from contrastive.data.sources import iter_tar_samples

    return list(iter_tar_samples(str(path)))


@pytest.mark.parametrize("if_range", [True, False])
def test_an_object_replaced_mid_read_is_read_again_whole_never_spliced(demo_data, tmp_path, if_range):
    """The first GET is reset half-way and the shard replaced by another of other samples (and
    length) before the reader asks for the rest: with If-Range the server answers the new object
    whole; a server that ignores If-Range answers the rest of the new one, whose ETag and length
    give it away. Either way every sample delivered is whole, of one version, at its place."""
    from contrastive.data.shards import Shard

    old, new = sorted((demo_data / "train").glob("*.tar"))[:2]
    site = tmp_path / "site"
    site.mkdir()
    (site / "x.tar").write_bytes(old.read_bytes())
    versions = [samples_of(old), samples_of(new)]

    def replace() -> None:
        (site / "x.tar").write_bytes(new.read_bytes() + (b"" if if_range else b"\0" * 1024))

    with http_server(site, ranges=True, if_range=if_range) as url:
        # a link of 5 MB/s, so that the reader has taken part of the body when the reset comes
        with FaultProxy(url, reset_every=1, max_resets=1, on_reset=replace, bandwidth=5e6) as proxy:
            slots = list(read_segments([(Shard(f"{proxy.url}/x.tar", None), 0, None, None)]))
    assert proxy.served["resets"] == 1
    assert not [s for s in slots if "__error__" in s]
    assert slots[-1].get("__restarts__") == 1  # counted (data/changed_shards)
    first, second = versions
    for i, slot in enumerate(slots):
        got = {k: v for k, v in slot.items() if not k.startswith("__") or k == "__key__"}
        assert got in (first[i] if i < len(first) else None, second[i]), f"slot {i} is of neither version whole"
    assert slots[0]["__key__"] == first[0]["__key__"] and slots[-1]["__key__"] == second[-1]["__key__"]
