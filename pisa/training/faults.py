"""Faults a test injects into a training (`config["faults"]`): a NaN loss at a global
iteration, a worker killed or stalled mid-epoch. They come in as a session wrapper
(`with_faults`) around the worker's real session: the train loop knows nothing of them,
and nothing here runs unless a test asks."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class FaultInjectingSession:
    """A `TrainSession` that passes everything to `inner` and injects `faults` at its
    per-step hooks: the kill or stall before a step, the NaN in a step's loss."""

    def __init__(self, inner: Any, faults: Faults):
        self.inner, self.faults = inner, faults
        self.rank, self.world_size = inner.rank, inner.world_size

    def __getattr__(self, name: str) -> Any:  # device, prepare_model, report, ...: the inner's
        return getattr(self.inner, name)

    def before_step(self, epoch: int, step: int) -> None:
        self.faults.at_step(epoch, step, self.rank)
        self.inner.before_step(epoch, step)

    def step_loss(self, loss: torch.Tensor, iteration: int) -> torch.Tensor:
        return self.inner.step_loss(self.faults.poisoned(loss, iteration, self.rank), iteration)


def with_faults(session: Any, spec: dict[str, Any] | None) -> Any:
    """`session` itself, or wrapped in the faults a test's `config["faults"]` asks for."""
    return FaultInjectingSession(session, Faults(**spec)) if spec else session
