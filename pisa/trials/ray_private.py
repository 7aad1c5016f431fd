"""Ray's private API: the one module of pisa that touches it (ruff's SLF001 is off here alone).

Ray has no public way to do these; each function says what it needs, and its callers
carry on without it on a Ray that has changed (they catch the error or check for None).
"""

from __future__ import annotations

from typing import Any


def calm_trial_table(table: Any, columns: list[str]) -> None:
    """Tune's terminal trial table (`TuneTerminalReporter`) without a heartbeat of its own (the
    caller prints it at its own interval), showing `columns` (Tune picks a result's first 4 keys)."""
    table._heartbeat_freq = 0
    table._inferred_metric = columns


def latest_checkpoint_result(trial: Any) -> Any | None:
    """The result of a restored trial's latest checkpoint (`.checkpoint`: its path and file
    system), as Tune's checkpoint bookkeeping has it; None without one."""
    manager = getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)
    return getattr(manager, "_latest_checkpoint_result", None)


def checkpoint_results(trial: Any) -> list[Any]:
    """The results of every checkpoint Tune keeps for a trial."""
    return list(trial.run_metadata.checkpoint_manager._checkpoint_results)


def checkpoint_result(checkpoint: Any) -> Any:
    """A result of Tune's bookkeeping for `checkpoint`, without metrics."""
    from ray.train._internal.session import _TrainingResult

    return _TrainingResult(checkpoint=checkpoint, metrics={})


def replace_checkpoint_results(trial: Any, kept: list[Any], latest: Any | None) -> None:
    """Make `kept` the trial's checkpoints and `latest` (one of them, or None: from scratch)
    the one it continues from; Tune has no public setter for either."""
    manager = trial.run_metadata.checkpoint_manager
    manager._checkpoint_results = kept
    manager._latest_checkpoint_result = latest
    trial.run_metadata.invalidate_cache()
