"""The loader's decoding against damaged samples: thousands of seeded, structure-aware mutants of real
media and metadata (tests/sample_fuzz.py), each decoded as the loader decodes it, in a child process
under a wall-clock bound and a memory limit: none ends a run, none loses something uncounted, and the
child's resident memory stays within a stated bound."""

from __future__ import annotations

from collections import Counter

from sample_fuzz import GOOD, run_cases

CASES = 5000
MEMORY_MB = 768  # address space the child may add to its imports' (a case past it: MemoryError)
PEAK_MB = 1024  # the child's resident memory, imports included, after any case
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
    peak_kib = max(int(line) for line in peaks.read_text().split())
    assert peak_kib < PEAK_MB * 1024, f"a child reached {peak_kib / 1024:.0f} MB resident"
