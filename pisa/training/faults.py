"""Faults a test injects into the train loop (`config["faults"]`): a NaN loss at a global
iteration, a worker killed or stalled mid-epoch. Nothing here runs unless a test asks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.progress import say


@dataclass
class Faults:
    """Faults a test injects (`config["faults"]`): a NaN loss, a killed or stalled worker."""

    nan_at: int | None = None
    nan_log: str | None = None  # a file each worker appends a line to when it injects the NaN
    kill_at: str | None = None
    stall_at: str | None = None

    def at_step(self, epoch: int, step: int, rank: int) -> None:
        """Kill or stall this worker here, if a test asked for it at this step."""
        maybe_inject_failure(self.kill_at, epoch, step, rank, self.stall_at)

    def poisoned(self, loss: torch.Tensor, iteration: int, rank: int) -> torch.Tensor:
        """The loss, made NaN at the global iteration `nan_at` (noted in `nan_log`)."""
        if self.nan_at is not None and iteration == int(self.nan_at):
            loss = loss * float("nan")
            if self.nan_log:
                with open(self.nan_log, "a") as log:
                    log.write(f"rank {rank}\n")
        return loss


def maybe_inject_failure(spec: str | None, epoch: int, iteration: int, rank: int, stall: str | None = None) -> None:
    """Fault injection for tests: 'EPOCH:ITER:MARKER' kills rank 0 once, mid-epoch; `stall`
    ('EPOCH:ITER:PIDFILE') makes rank 0 write its pid and wait there once, for a test to
    kill it (or the driver) from outside, or to let it go on by creating PIDFILE.go."""
    if stall:
        e, i, pidfile = stall.split(":", 2)
        if epoch == int(e) and iteration == int(i) and not Path(pidfile).exists() and rank == 0:
            Path(pidfile).with_suffix(".tmp").write_text(f"{os.getpid()}\n")
            Path(pidfile).with_suffix(".tmp").rename(pidfile)
            say(f"fault injection: worker {os.getpid()} waits at epoch {epoch} iteration {iteration}")
            go, deadline = Path(pidfile + ".go"), time.time() + 600
            while not go.exists() and time.time() < deadline:
                time.sleep(0.2)
    if not spec:
        return
    e, i, marker = spec.split(":", 2)
    if epoch == int(e) and iteration == int(i) and not Path(marker).exists() and rank == 0:
        Path(marker).write_text("killed\n")
        say(f"fault injection: killing this worker at epoch {epoch} iteration {iteration}")
        os._exit(1)
