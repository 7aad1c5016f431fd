"""Every fault a test injects, from one place: into a training's workers (`config["faults"]`,
which the driver fills from `PISA_FAULTS`: a NaN loss at a global iteration, a worker killed
or stalled mid-epoch) and into a study's driver (`PISA_DRIVER_FAULTS`: the driver killed the
Nth time it passes a named point). The training loop asks its `Faults` at two places of a
step and the driver's callbacks call `driver_fault` at theirs; without a test's variable
both do nothing. No session or callback has a fault method of its own."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.progress import say

if TYPE_CHECKING:
    import torch

DRIVER_FAULTS_ENV = "PISA_DRIVER_FAULTS"  # the study driver's faults (see driver_fault)


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


def from_config(spec: dict[str, Any] | None) -> Faults:
    """The faults a test's `config["faults"]` asks for (none: a `Faults` that does nothing)."""
    return Faults(**spec) if spec else Faults()


def driver_fault(point: str) -> None:
    """`PISA_DRIVER_FAULTS={"kill_at": "POINT:N"}` kills this driver with SIGKILL the Nth time
    it passes POINT (trial_complete, checkpoint, mlflow_write): a crash at a known place for
    the recovery tests."""
    spec = os.environ.get(DRIVER_FAULTS_ENV)
    if not spec:
        return
    where, _, count = json.loads(spec).get("kill_at", "").partition(":")
    if where != point:
        return
    _DRIVER_FAULT_COUNTS[point] = _DRIVER_FAULT_COUNTS.get(point, 0) + 1
    if _DRIVER_FAULT_COUNTS[point] == int(count or 1):
        say(f"fault injection: killing the driver at {point} #{count or 1}")
        os.kill(os.getpid(), signal.SIGKILL)


_DRIVER_FAULT_COUNTS: dict[str, int] = {}
