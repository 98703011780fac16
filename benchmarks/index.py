"""The search index at a million rows: what `contrastive-embed index` builds above its exact limit (an
inverted file, lists ~ 4 sqrt(n)), against exact search over the same vectors in the same process.

Random unit vectors, uniform on the sphere (the hardest case for an inverted file: nothing clusters,
and a query's ten nearest rows are barely nearer than any others) or with `--clusters N` around N
random centres (as embeddings gather around concepts); build time, index size on disk, the resident
memory of a process that reads the index memory-mapped vs loaded, single-query latency p50/p99, and
recall@10 against exact search, at the nprobe the builder picks and at a few others.

    .venv/bin/python benchmarks/index.py                  # 1M x 128, ~5 min on 2 cores
    .venv/bin/python benchmarks/index.py --clusters 10000
    .venv/bin/python benchmarks/index.py --rows 200000 --dim 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESIDENT = """
import sys
import faiss, numpy as np
if sys.argv[2] != "none":
    index = faiss.read_index(sys.argv[1], faiss.IO_FLAG_MMAP if sys.argv[2] == "mmap" else 0)
    faiss.extract_index_ivf(index).nprobe = int(sys.argv[3])
    index.search(np.ones((1, index.d), "float32") / index.d**0.5, 10)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


def resident_mb(path: Path, mode: str, nprobe: int) -> float:
    """Peak resident memory (MB) of a fresh process that reads the index (`mmap`, `load`; `none`:
    imports only) and searches once."""
    args = [sys.executable, "-c", RESIDENT, str(path), mode, str(nprobe)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def latency(index, queries: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    """(p50 ms, p99 ms, ids) over one-query searches."""
    times, ids = [], []
    for q in queries:
        start = time.perf_counter()
        _, found = index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1000)
        ids.append(found[0])
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), np.stack(ids)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def main() -> None:
    import faiss

    from contrastive.search import build_vectors_index

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=0, help="0: uniform; N: around N random centres")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.clusters:  # points around random centres, as real embeddings gather around concepts
        centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, args.clusters, args.rows)]
        x += rng.standard_normal((args.rows, args.dim), dtype=np.float32) * (0.5 / np.sqrt(args.dim))
    else:
        x = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    noise = rng.standard_normal((args.queries, args.dim), dtype=np.float32) * (0.1 / np.sqrt(args.dim))
    queries = x[rng.choice(args.rows, args.queries, replace=False)] + noise  # a query near a row
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    what = f"in {args.clusters} clusters" if args.clusters else "uniform on the sphere"
    print(f"{args.rows} x {args.dim} unit vectors {what}; {args.queries} queries near random rows; k={args.k}")

    start = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(x)
    exact_build = time.perf_counter() - start
    p50, p99, truth = latency(exact, queries, args.k)
    print(f"exact (Flat): build {exact_build:.1f} s, query p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
    rows = {"exact": {"build_s": exact_build, "p50_ms": p50, "p99_ms": p99, "recall@10": 1.0}}

    start = time.perf_counter()
    index, kind, params = build_vectors_index(x, exact_below=0)
    build = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        faiss.write_index(index, str(path))
        size_mb = path.stat().st_size / 2**20
        del index, exact
        mapped_mb, loaded_mb, bare_mb = (resident_mb(path, mode, params["nprobe"]) for mode in ("mmap", "load", "none"))
        mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        ivf = faiss.extract_index_ivf(mapped)
        print(
            f"{kind}: build {build:.1f} s (train on {params['train']} rows), {size_mb:.0f} MB on disk, "
            f"a process that reads it and searches once: {mapped_mb:.0f} MB resident memory-mapped, "
            f"{loaded_mb:.0f} MB loaded ({bare_mb:.0f} MB for Python and faiss alone)",
            flush=True,
        )
        chosen_probe = params["nprobe"]
        for nprobe in sorted({chosen_probe // 2 or 1, chosen_probe, chosen_probe * 2, chosen_probe * 4}):
            ivf.nprobe = nprobe
            p50, p99, found = latency(mapped, queries, args.k)
            r = recall(found, truth)
            chosen = " (the builder's)" if nprobe == chosen_probe else ""
            print(f"  nprobe {nprobe:4d}{chosen}: p50 {p50:6.2f} ms, p99 {p99:6.2f} ms, recall@{args.k} {r:.3f}")
            rows[f"nprobe={nprobe}"] = {"p50_ms": p50, "p99_ms": p99, "recall@10": r}
        del mapped, ivf
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "rows": args.rows,
        "clusters": args.clusters,
        "dim": args.dim,
        "kind": kind,
        "params": params,
        "build_s": build,
        "size_mb": size_mb,
        "mapped_mb": mapped_mb,
        "loaded_mb": loaded_mb,
        "python_faiss_mb": bare_mb,
        "peak_rss_mb": peak,
        "searches": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
