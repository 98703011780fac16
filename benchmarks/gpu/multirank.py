"""The multi-rank path on a machine with one GPU: every collective on the device the group serves.

    python benchmarks/gpu/multirank.py --out OUT/multirank.json             (the lent GPU; check.sh)
    python benchmarks/gpu/multirank.py --out /tmp/multirank.json --dry-run   (CPU, gloo; .ci/run)

NCCL refuses two ranks on one GPU, and gloo on the CPU serves host tensors too, so neither shows a
host tensor reaching a collective that only serves the device. Two cases do, on one GPU:
  two_ranks    two ranks share the GPU in a group bound to CUDA only (`trainer.dist_backend=cuda:gloo`:
               gloo, but refusing host tensors as NCCL does);
  nccl_forced  one rank under NCCL with every collective forced (`trainer.force_collectives=true`).
Each trains the tiny towers on synthetic image-text shards with an evaluation and a checkpoint, is sent
SIGTERM mid-run (every rank, as a scheduler does), then resumes from `latest` to the end. A case
passes when the stop is clean (exit 0, a checkpoint before the end), the resume ends at max_steps with
an evaluation, and the metrics hold every step exactly once. The dry run takes the same steps on the
CPU under gloo (two ranks; one rank forced), so that the script keeps working between leases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import shards_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
CASES = {
    False: {  # on the lent GPU
        "two_ranks": (2, ["trainer.device=cuda", "trainer.dist_backend=cuda:gloo"]),
        "nccl_forced": (1, ["trainer.device=cuda", "trainer.dist_backend=nccl", "trainer.force_collectives=true"]),
    },
    True: {  # the dry run, on the CPU
        "two_ranks": (2, ["trainer.device=cpu", "trainer.dist_backend=gloo", "trainer.threads=1"]),
        "nccl_forced": (1, ["trainer.device=cpu", "trainer.force_collectives=true", "trainer.threads=1"]),
    },
}


def launch(ranks: int, data: str, run_dir: Path, extra: list[str]) -> subprocess.Popen:
    overrides = [
        "model=tiny",
        "modalities=[image,text]",
        "modality.image.image_size=32",
        "modality.text.context_length=16",
        f"data.train={data}",
        f"data.eval={data}",
        "eval.max_samples=64",
        "data.batch_size=8",
        "data.num_workers=1",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "trainer.measure_every=4",
        "trainer.eval_every=8",
        "trainer.save_every=4",
        "trainer.progress=false",
        "trainer.dist_timeout=120",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.Popen(
        [*command, "-m", "contrastive.cli.train", *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop_when(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float) -> None:
    """SIGTERM to every rank once the metrics reach `step`, as a preempting scheduler sends it to the
    job step's processes (torchrun itself would end with an error of its own on it)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= step for r in rows(run_dir)):
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGTERM)
            return
        time.sleep(0.2)
    raise RuntimeError(f"the run never reached step {step} within {timeout:.0f} s")


def case(ranks: int, data: str, run_dir: Path, extra: list[str], timeout: float) -> dict:
    t0 = time.time()
    proc = launch(ranks, data, run_dir, extra)
    stop_when(proc, run_dir, STEPS // 2 - 2, timeout)
    out, _ = proc.communicate(timeout=timeout)
    latest = run_dir / "checkpoints" / "latest"
    stopped = int(latest.read_text().strip().removeprefix("step_")) if latest.exists() else None
    if proc.returncode != 0 or "received SIGTERM" not in out or not stopped or stopped >= STEPS:
        raise RuntimeError(f"the stop was not clean (exit {proc.returncode}, checkpoint {stopped}):\n{out[-3000:]}")
    proc = launch(ranks, data, run_dir, [*extra, "resume=latest"])
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the resume failed (exit {proc.returncode}):\n{out[-3000:]}")
    steps = [r["step"] for r in rows(run_dir) if "loss" in r]
    evaluated = [r["step"] for r in rows(run_dir) if any(k.startswith("eval/") for k in r)]
    if steps != list(range(1, STEPS + 1)) or STEPS not in evaluated:
        raise RuntimeError(f"metrics: steps {steps}, evaluations at {evaluated}:\n{out[-3000:]}")
    losses = [r["loss"] for r in rows(run_dir) if "loss" in r]
    return {
        "ranks": ranks,
        "overrides": extra,
        "stopped_at": stopped,
        "evaluated_at": evaluated,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": round(time.time() - t0, 1),
        "passed": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/contrastive-multirank"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for each launch")
    args = parser.parse_args()
    settings = {"image_size": 32, "audio_seconds": 1.0, "samples": 256}
    data = shards_stage(settings, args.work, kinds=("image_text",))["image_text"]["path"]
    result: dict = {"dry_run": args.dry_run, "steps": STEPS}
    for name, (ranks, extra) in CASES[args.dry_run].items():
        print(f"== {name}: {ranks} rank(s), {' '.join(extra)}", flush=True)
        try:
            shutil.rmtree(args.work / name, ignore_errors=True)
            result[name] = case(ranks, data, args.work / name, extra, args.timeout)
        except Exception as e:  # noqa: BLE001 - recorded; the next case runs
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"   {json.dumps(result[name])[:1500]}", flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if all(result[name].get("passed") for name in CASES[args.dry_run]) else 1)


if __name__ == "__main__":
    main()
