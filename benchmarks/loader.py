"""Loader throughput: the full pipeline (image + audio + text decode and transforms, batching) with
1 and 2 DataLoader workers, against a bare read of the same shards (bytes only) in the same run,
and the tiny model's training step on the same machine, which the pipeline must keep ahead of.

Remote rows, same run, 2 workers: the same shards from an HTTP server (Python's) through the fault
proxy of tests/servers.py set to 50 ms a request and 50 MB/s, and from an S3-compatible server
(moto), against the local figure (measured before and after them, averaged). `--no-remote` skips them.

Long clips, same run, 2 workers, audio and text: 48 samples whose clips are 10 minutes long against
the same samples cut to 10 seconds (tones repeating every 4096 frames, FLAC written frame by frame by
tests/pathological.py: ~7 MB a 10-minute clip). Audio is read by window, so the two should match
(within 20%); decoding each clip whole made the long ones ~60x slower. `--no-long-clips` skips them.

    .venv/bin/python benchmarks/loader.py                      # the demo set (built if missing)
    .venv/bin/python benchmarks/loader.py --data data/demo/train --batch-size 64

The last line is one JSON object with the figures and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_modalities():
    """The modalities of `model=tiny`, composed as contrastive-train composes them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from contrastive.builders import build_modalities
    from contrastive.config import CONFIG_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny"])
    return build_modalities(list(cfg.modalities), OmegaConf.to_container(cfg.modality)), cfg.model.embed_dim


def bare_read(sources) -> tuple[int, float]:
    from contrastive.data.sources import exact_slots

    t0 = time.perf_counter()
    n = sum(1 for _ in exact_slots(sources, seed=0, epoch=0, shuffle=False, worker=0, workers=1))
    return n, time.perf_counter() - t0


def pipeline(sources, modalities, batch_size: int, workers: int) -> tuple[int, float]:
    """Samples per second over one epoch, timed from the first batch (worker start-up excluded)."""
    from contrastive.data import ShardDataset, make_loader

    ds = ShardDataset(sources, modalities, batch_size=batch_size, train=True, num_workers=workers, seed=0)
    it = iter(make_loader(ds))
    first = next(it)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += sum(1 for k in batch["__key__"] if k)
    del first
    return n, time.perf_counter() - t0


def train_step(sources, modalities, embed_dim: int, batch_size: int, steps: int) -> tuple[int, float]:
    """Samples per second of forward + backward + AdamW on real batches (loaded beforehand)."""
    import torch

    from contrastive.builders import build_objective
    from contrastive.data import ShardDataset, make_loader

    ds = ShardDataset(sources, modalities, batch_size=batch_size, train=True, num_workers=0, seed=0)
    loader = iter(make_loader(ds))
    batches = [next(loader) for _ in range(min(steps + 2, len(ds)))]
    torch.manual_seed(0)
    objective = build_objective(modalities, embed_dim=embed_dim)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)

    def step(batch):
        loss, _ = objective(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for batch in batches[:2]:  # warm-up
        step(batch)
    t0 = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    return batch_size * len(batches[2:]), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a training set directory (default: data/demo/train, built if missing)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--no-remote", action="store_true", help="skip the HTTP and S3 rows")
    parser.add_argument("--no-long-clips", action="store_true", help="skip the 10-minute clips row")
    args = parser.parse_args()
    import torch

    from contrastive.data import load_sources
    from contrastive.flops import cpu_name

    data = args.data or str(REPO / "data" / "demo" / "train")
    if not Path(data, "sizes.json").exists():
        from contrastive.data_tools.demo import build_demo

        tmp = tempfile.mkdtemp(prefix="demo-")
        print(f"building the demo set in {tmp}", file=sys.stderr)
        build_demo(tmp)
        data = str(Path(tmp) / "train")
    sources = load_sources(data)
    modalities, embed_dim = tiny_modalities()
    torch.set_num_threads(os.cpu_count() or 1)

    n, secs = bare_read(sources)
    result = {
        "data": data,
        "cpus": os.cpu_count(),
        "cpu": cpu_name(),
        "batch_size": args.batch_size,
        "bare_read": {"samples": n, "seconds": secs, "samples_per_s": n / secs},
    }
    print(f"bare read (bytes only):        {n / secs:9.0f} samples/s", flush=True)
    for workers in (1, 2):
        n, secs = pipeline(sources, modalities, args.batch_size, workers)
        result[f"pipeline_{workers}_workers"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}
        print(f"full pipeline, {workers} worker(s):     {n / secs:9.0f} samples/s", flush=True)
    n, secs = train_step(sources, modalities, embed_dim, args.batch_size, args.train_steps)
    result["train_step"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}
    print(f"tiny model training step:      {n / secs:9.0f} samples/s", flush=True)
    bare = result["bare_read"]["samples_per_s"]
    train = result["train_step"]["samples_per_s"]
    result["ratios"] = {
        f"pipeline_{w}_workers_over_bare_read": result[f"pipeline_{w}_workers"]["samples_per_s"] / bare for w in (1, 2)
    }
    result["ratios"].update(
        {
            f"pipeline_{w}_workers_over_train_step": result[f"pipeline_{w}_workers"]["samples_per_s"] / train
            for w in (1, 2)
        }
    )
    if not args.no_long_clips:
        result["long_clips"] = long_clip_rows(modalities, args.batch_size)
    if not args.no_remote:
        result["remote"] = remote_rows(data, modalities, args.batch_size, result["pipeline_2_workers"])
    print(json.dumps(result))


def long_clip_rows(modalities, batch_size: int, samples: int = 64, batches: int = 150) -> dict:
    """2-worker pipeline throughput, audio and text, on 10-minute clips against the same cut to 10 s:
    `batches` batches of the set read round and round (every read decodes again), timed from the first."""
    sys.path.insert(0, str(REPO / "tests"))
    from contrastive.data import ShardDataset, load_sources, make_loader
    from contrastive.data.shards import ShardWriter

    from pathological import looped_flac

    chosen = {name: modalities[name] for name in ("audio", "text")}
    rows, work = {}, Path(tempfile.mkdtemp(prefix="long-clips-"))
    for seconds in (600, 10):
        with ShardWriter(work / f"{seconds}s", prefix="clips", max_count=8) as writer:
            for i in range(samples):
                writer.write({"__key__": f"c{i:04d}", "flac": looped_flac(seconds, seed=i % 8), "txt": f"tone {i % 8}"})
        ds = ShardDataset(load_sources(str(work / f"{seconds}s")), chosen, batch_size=batch_size // 4, train=True,
                          num_workers=2, seed=0)  # fmt: skip
        ds.endless = True
        it = iter(make_loader(ds))
        next(it)
        t0, n = time.perf_counter(), 0
        for _ in range(batches):
            n += sum(1 for k in next(it)["__key__"] if k)
        secs = time.perf_counter() - t0
        del it
        rows[f"clips_{seconds}s"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}
        print(f"{seconds:4d} s clips, audio + text:  {n / secs:9.0f} samples/s (2 workers)", flush=True)
    rows["ratio_600s_over_10s"] = rows["clips_600s"]["samples_per_s"] / rows["clips_10s"]["samples_per_s"]
    print(f"10-minute clips / 10-second clips: {rows['ratio_600s_over_10s']:.2f}x (target >= 0.8x)", flush=True)
    return rows


def remote_rows(data: str, modalities, batch_size: int, local_before: dict) -> dict:
    """2-worker pipeline throughput over HTTP (through the 50 ms, 50 MB/s proxy) and S3, over local."""
    import subprocess

    sys.path.insert(0, str(REPO / "tests"))
    from contrastive.data import load_sources

    from servers import http_server, s3_env, s3_server, upload

    rows = {}
    root, name = Path(data).parent, Path(data).name
    with http_server(root) as url:
        proxy = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "servers.py"), "proxy", "--upstream", url]
            + ["--latency-ms", "50", "--mbps", "50"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            proxied = proxy.stdout.readline().strip()
            n, secs = pipeline(load_sources(f"{proxied}/{name}"), modalities, batch_size, 2)
        finally:
            proxy.terminate()
            proxy.wait()
    rows["http_proxy_50ms_50MBps"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}
    print(f"over HTTP, 50 ms + 50 MB/s:    {n / secs:9.0f} samples/s (2 workers)", flush=True)
    with s3_server() as endpoint:
        upload(data, "s3://bench/train", endpoint)
        os.environ.update(s3_env(endpoint))
        n, secs = pipeline(load_sources("s3://bench/train"), modalities, batch_size, 2)
    rows["s3_moto"] = {"samples": n, "seconds": secs, "samples_per_s": n / secs}
    print(f"over S3 (moto):                {n / secs:9.0f} samples/s (2 workers)", flush=True)
    n, secs = pipeline(load_sources(data), modalities, batch_size, 2)
    after = n / secs
    print(f"local again:                   {after:9.0f} samples/s (2 workers)", flush=True)
    local = (local_before["samples_per_s"] + after) / 2
    rows["local_2_workers_mean"] = local
    rows["ratios"] = {k: v["samples_per_s"] / local for k, v in rows.items() if isinstance(v, dict)}
    for k, ratio in rows["ratios"].items():
        print(f"{k} / local: {ratio:.2f}x (target >= 0.9x)", flush=True)
    return rows


if __name__ == "__main__":
    main()
