"""What the fuzzers share (tests/tar_fuzz.py, tests/sample_fuzz.py): their cases run in child
processes, each case under a wall-clock bound and the child under a memory limit, and the parent
knows which case hung or killed its child.

    parent:  run_in_children(SCRIPT, args, seconds=5.0)   -> {case index: (status, detail)}
    child:   limit_memory(args["memory_mb"]); serve_cases(args["indices"], 5.0, run_case)

A child prints one JSON line per case, `[index, status, detail]`; a case after which the child dies
is a `crash`, one it does not answer within twice the bound a `timeout`, and the parent starts a new
child for the cases left.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent


class Timeout(BaseException):
    """A case ran past its bound (raised by the alarm, past every `except Exception`)."""


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def limit_memory(memory_mb: int) -> None:
    """The child's address space may grow `memory_mb` beyond what it has mapped now (its imports)."""
    limit = _vm_bytes() + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve_cases(indices: Iterable[int], seconds: float, run_case: Callable[[int], tuple[str, str]]) -> None:
    """The child's loop: each case run under an alarm of `seconds`, its outcome printed."""

    def alarm(*_):
        raise Timeout

    signal.signal(signal.SIGALRM, alarm)
    for index in indices:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            status, detail = run_case(index)
        except Timeout:
            status, detail = "timeout", f"over {seconds} s"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps([index, status, detail]), flush=True)


def run_in_children(script: Path, args: dict[str, Any], *, seconds: float) -> dict[int, tuple[str, str]]:
    """{case index: (status, detail)} for each of args["indices"], run by `script` (whose main reads
    its arguments as JSON from argv[1]) in as many children as the cases that kill one need."""
    pending, results = list(args["indices"]), {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    while pending:
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps({**args, "indices": pending})],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        started, first = time.monotonic(), True
        while pending:
            # the first answer waits for the child's imports too
            ready, _, _ = select.select([proc.stdout], [], [], 2 * seconds + (30 if first else 0))
            line = proc.stdout.readline() if ready else ""
            if not line:  # the child died, or went silent past the bound: this case is what did it
                proc.kill()
                proc.wait()
                results[pending.pop(0)] = (
                    "timeout" if not ready else "crash",
                    f"child after {time.monotonic() - started:.1f} s",
                )
                break
            first = False
            index, status, detail = json.loads(line)
            assert index == pending[0], (index, pending[0])
            results[pending.pop(0)] = (status, detail)
        else:
            proc.wait()
    return results
