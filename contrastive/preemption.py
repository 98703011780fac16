"""Stopping on a signal without losing anything: the step in flight finishes, a checkpoint is
written, and (on SLURM, for the signal sent ahead of the time limit) the job is requeued.

SIGTERM (preemption, `scancel`, a launcher stopping) and SIGUSR1 (`sbatch --signal=USR1@120`, the
warning before a time limit) only set a flag here. The training loop hands this rank's `signal` to
the step's agreed flags (contrastive.distributed.AgreedFlags: one small device all-reduce a step,
read a step later) and tells every rank the agreed signal through `agreed`, so all of them stop
after the same step even when the signal reached them at different moments.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from contrastive.distributed import is_main

log = logging.getLogger("contrastive")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, signals=SIGNALS):
        self.signal: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            log.warning(
                "received %s: finishing this step, then checkpointing and stopping", signal.Signals(signum).name
            )
        self.signal = self.signal or signum

    def pending(self) -> int:
        """This rank's signal (0: none), for the ranks to agree on."""
        return int(self.signal or 0)

    def agreed(self, signum: int) -> None:
        """The signal the ranks agreed on: a rank that received none stops for another's."""
        if signum and self.signal is None:
            self.signal = int(signum)

    def requeue_if_slurm(self) -> bool:
        """After a SIGUSR1 (time limit ahead) inside a SLURM job, rank 0 requeues the job; it then
        starts again in the same run directory and resumes from `latest` by itself."""
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
        job = (
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            if job
            else os.environ.get("SLURM_JOB_ID")
        )
        if self.signal != signal.SIGUSR1 or not job:
            return False
        if is_main():
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if out.returncode != 0:
                log.error("scontrol requeue %s failed: %s", job, out.stderr.strip())
                return False
            log.info("requeued SLURM job %s", job)
        return True


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: signals are the training process's to handle; a worker killed by
    one would turn a clean stop into a crash."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
