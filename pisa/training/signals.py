"""SIGTERM handled as Ctrl-C is: what Kubernetes, Slurm and `timeout` send to stop a job.

Python ends a process on SIGTERM without running anything: a study's runs stayed RUNNING
in MLflow and the study could not tell it had been stopped. Here SIGTERM goes to whatever
handles SIGINT at that moment (Tune's graceful stop during a study, Ray Train's abort
during `pisa train`, else a `KeyboardInterrupt`), so the same clean-up runs, and the
command exits 143 (128 + SIGTERM) instead of 130.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

_received: list[int] = []


_installed = False


def install() -> None:
    """Route SIGTERM to the SIGINT handler of the moment (main thread only)."""
    global _installed
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True


def reinstall() -> None:
    """Take SIGTERM back after a library installed its own handler (Ray's core does, in
    `ray.init`: it logs the signal and ends the process, leaving the runs RUNNING). Only
    where `install` was called (the `pisa` command), and only from the main thread."""
    import threading

    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if _interrupt_at_once:
        raise KeyboardInterrupt
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored or left to the system: stop here all the same
        raise KeyboardInterrupt


_interrupt_at_once = False


@contextlib.contextmanager
def interrupting_at_once() -> Iterator[None]:
    """SIGTERM as a `KeyboardInterrupt` right where the main thread is, not through the SIGINT
    handler of the moment: Ray Train's (in `TorchTrainer.fit`) aborts the run and then exits
    the process itself, before the caller can mark its MLflow run."""
    global _interrupt_at_once
    before, _interrupt_at_once = _interrupt_at_once, True
    try:
        yield
    finally:
        _interrupt_at_once = before


def terminated() -> bool:
    """Whether this process was asked to stop by SIGTERM."""
    return bool(_received)


def interrupt_exit_code() -> int:
    """The exit code of a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    return 128 + signal.SIGTERM if terminated() else 130
