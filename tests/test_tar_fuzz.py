"""The shard reader against damaged tars: thousands of seeded mutations of real demo shards, each read
in a child process under a wall-clock bound and a memory limit (tests/tar_fuzz.py), and the corpus
of cases that once hung, blew up or escaped the loader's count (tests/data/tar_corpus), replayed by
name."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from tar_fuzz import GOOD, run_cases

CORPUS = Path(__file__).resolve().parent / "data" / "tar_corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
CASES = 12000  # ~6 s on 2 cores; seeds differ per run of the suite only if this file changes
MEMORY_MB = 256  # above the child's own footprint: no case may take more
SECONDS = 5.0


@pytest.fixture(scope="module")
def bases(demo_data, tmp_path_factory) -> list[str]:
    """Real demo shards, cut to their first 12 members (images, audio, captions, labels) and written
    in the three tar formats shards come in (ustar, pax with a record per member, GNU long names)."""
    src = sorted((demo_data / "train").glob("*.tar"))[0]
    with tarfile.open(src) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()[:12]]
    out = tmp_path_factory.mktemp("fuzz-bases")
    paths = []
    for fmt, name in ((tarfile.USTAR_FORMAT, "ustar"), (tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for i, (member, data) in enumerate(members):
                long = fmt != tarfile.USTAR_FORMAT and i % 4 == 0
                info = tarfile.TarInfo("long/" * 30 + member if long else member)
                info.size, info.mtime = len(data), 1.5e9 + 0.25 if fmt == tarfile.PAX_FORMAT else 0
                tar.addfile(info, io.BytesIO(data))
        (out / f"{name}.tar").write_bytes(buf.getvalue())
        paths.append(str(out / f"{name}.tar"))
    return paths


def test_mutated_shards_never_hang_exhaust_memory_or_escape_the_count(bases):
    results = run_cases(bases, seed=2026, indices=range(CASES), memory_mb=MEMORY_MB, seconds=SECONDS)
    outcomes = Counter(status for status, _ in results.values())
    failures = {i: r for i, r in results.items() if r[0] not in GOOD}
    assert len(results) == CASES
    assert not failures, f"{len(failures)} cases failed ({outcomes}); the first: {list(failures.items())[:5]}"
    # the mutator reaches both sides: archives still read whole, and damage the reader refuses
    assert outcomes["ok"] > CASES // 10 and outcomes["read_error"] > CASES // 10, outcomes


@pytest.fixture(scope="module")
def corpus_results(bases) -> dict[str, tuple[str, str]]:
    names = sorted(MANIFEST)
    results = run_cases(
        bases,
        seed=0,
        indices=range(len(names)),
        memory_mb=MEMORY_MB,
        seconds=SECONDS,
        files=[str(CORPUS / name) for name in names],
    )
    return {names[i]: result for i, result in results.items()}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_a_case_that_once_failed_is_read_or_refused_now(corpus_results, name):
    status, detail = corpus_results[name]
    assert status in GOOD, (
        f"{name} ({MANIFEST[name]['made_by']}; the old reader: {MANIFEST[name]['old_reader']}): {status}: {detail}"
    )


@pytest.mark.parametrize(
    "name,message",
    [
        ("pax-record-length-zero.tar", "malformed pax record at byte 1536: length 0 does not fit"),
        ("size-2e60.tar", f"the member at byte 0 claims {2**60} bytes, over the limit"),
        ("negative-base256-size.tar", f"negative size {-(2**40)} in the tar header at byte 1024"),
    ],
)
def test_the_named_cases_are_read_errors_that_say_where(corpus_results, name, message):
    status, detail = corpus_results[name]
    assert status == "read_error" and message in detail, (status, detail)
