"""Peak memory and time of the contrastive loss, forward + backward: our tiled InfoNCE against
open_clip's ClipLoss(local_loss=True, gather_with_grad=True), on one process holding the global
batch's worth of features, at global batch 4k, 16k and 64k.

    .venv/bin/python benchmarks/loss_memory.py                 # CPU: --dim 64 by default
    .venv/bin/python benchmarks/loss_memory.py --device cuda --dim 512

Each measurement runs in a fresh subprocess. Peak memory is the loss's own: on CUDA
max_memory_allocated above the features; on CPU the growth of the process's peak resident set
(ru_maxrss) above the features. Where open_clip's loss cannot fit in this machine's memory (its
[N, N] logits), it is not run: its figure is then extrapolated from the largest batch it ran at by
its N^2 growth and marked as such. The last line is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(impl: str, n: int, dim: int, tile: int, device: str, repeats: int) -> dict:
    """Runs in the child process: peak extra memory (bytes) and seconds of forward + backward."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device(device)
    a = F.normalize(torch.randn(n, dim, device=dev), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, dim, device=dev), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, device=dev, requires_grad=True)
    valid = torch.ones(n, dtype=torch.bool, device=dev)
    if impl in ("ours_tiled", "ours_plain"):
        from contrastive.loss.infonce import info_nce

        def run():
            return info_nce(a, b, valid, scale, tile_size=tile if impl == "ours_tiled" else 0)
    else:
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=1)

        def run():
            return clip_loss(a, b, scale)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        a.grad = b.grad = scale.grad = None
        loss = run()
        loss.backward()
        sync()
        return float(loss)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()  # the first run also measures peak memory
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_bytes": peak, "seconds": min(times), "loss": loss}


def run_child(impl: str, n: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--n",
        str(n),
        "--dim",
        str(args.dim),
        "--tile",
        str(args.tile),
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["ours_tiled", "ours_plain", "open_clip"])
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n, args.dim, args.tile, args.device, args.repeats)))
        return

    gib = 1024**3
    budget = 0.8 * available_bytes(args.device)
    from contrastive.flops import cpu_name

    results: dict = {
        "device": args.device,
        "cpu": cpu_name(),
        "dim": args.dim,
        "tile": args.tile,
        "threads": os.cpu_count(),
        "sizes": {},
    }
    last_clip = None  # (n, peak) of open_clip's largest run, for extrapolation
    print(f"{'batch':>7} {'impl':<11} {'peak MiB':>10} {'seconds':>9}  note")
    for n in args.sizes:
        row = {}
        for impl in ("open_clip", "ours_tiled"):
            note = ""
            if impl == "open_clip" and last_clip and last_clip[1] * (n / last_clip[0]) ** 2 > budget:
                est = last_clip[1] * (n / last_clip[0]) ** 2
                row[impl] = {"peak_bytes": est, "seconds": None, "extrapolated": True}
                note = (
                    f"not run: needs ~{est / gib:.1f} GiB (N^2 from batch {last_clip[0]}), "
                    f"{budget / gib:.1f} GiB usable"
                )
            else:
                row[impl] = run_child(impl, n, args)
                if impl == "open_clip" and "error" not in row[impl]:
                    last_clip = (n, row[impl]["peak_bytes"])
            r = row[impl]
            if "error" in r:
                print(f"{n:>7} {impl:<11} {'-':>10} {'-':>9}  failed: {r['error']}")
                continue
            secs = f"{r['seconds']:.2f}" if r.get("seconds") is not None else "-"
            print(f"{n:>7} {impl:<11} {r['peak_bytes'] / 2**20:>10.0f} {secs:>9}  {note}", flush=True)
        ours, clip = row["ours_tiled"], row["open_clip"]
        if "error" not in ours and "error" not in clip:
            row["memory_ratio"] = clip["peak_bytes"] / max(ours["peak_bytes"], 1)
            if clip.get("seconds"):
                row["time_ratio"] = ours["seconds"] / clip["seconds"]
                row["loss_abs_diff"] = abs(ours["loss"] - clip["loss"])
        results["sizes"][str(n)] = row
    for n, row in results["sizes"].items():
        parts = [f"batch {n}:"]
        if "memory_ratio" in row:
            tag = " (open_clip extrapolated)" if row["open_clip"].get("extrapolated") else ""
            parts.append(f"{row['memory_ratio']:.1f}x less peak memory{tag}")
        if "time_ratio" in row:
            parts.append(f"{row['time_ratio']:.2f}x open_clip's time")
        print("  ".join(parts))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
