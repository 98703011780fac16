"""The loader's decoding against damaged samples: thousands of seeded, structure-aware mutants of real
media and metadata (tests/sample_fuzz.py), each decoded as the loader decodes it, in a child process
under a wall-clock bound and a memory limit: none ends a run, none loses something uncounted, and no
case takes the child's resident memory more than 256 MB above what its imports hold (the previous
decoder: ~600 MB, a FLAC header claiming hours decoded whole)."""

from __future__ import annotations

from collections import Counter

from sample_fuzz import GOOD, run_cases

CASES = 5000
MEMORY_MB = 768  # address space the child may add to its imports' (a case past it: MemoryError)
GROWTH_MB = 256  # how far any case may take the child's resident memory above its imports' footprint
SECONDS = 5.0


def test_mutated_samples_never_end_a_run_escape_the_count_or_blow_up_memory(tmp_path):
    peaks = tmp_path / "peaks.txt"
    results = run_cases(seed=2026, indices=range(CASES), peaks=str(peaks), memory_mb=MEMORY_MB, seconds=SECONDS)
    outcomes = Counter(status for status, _ in results.values())
    failures = {i: r for i, r in results.items() if r[0] not in GOOD}
    assert len(results) == CASES
    assert not failures, f"{len(failures)} cases failed ({outcomes}); the first: {list(failures.items())[:5]}"
    # the mutator reaches both sides: samples that still decode, and damage the decoder counts
    assert outcomes["ok"] > CASES // 10 and outcomes["counted"] > CASES // 10, outcomes
    growth_kib = max(int(line) for line in peaks.read_text().split())
    assert growth_kib < GROWTH_MB * 1024, f"a case took its child {growth_kib / 1024:.0f} MB above its imports"
