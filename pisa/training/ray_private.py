"""Ray's private API: the one module of pisa that touches it (ruff's SLF001 is off here alone).

Ray has no public way to do these; each function says what it needs, and its callers
carry on without it on a Ray that has changed (they catch the error or check for None).
Checked against the versions in `CHECKED_AGAINST` (the lock, constraints.txt); every one
is listed in `PRIVATE_APIS`, which tests/test_private_apis.py resolves on the installed Ray.
"""

from __future__ import annotations

from typing import Any

from ..core.private_api import PrivateApi

CHECKED_AGAINST = {"ray": "2.60.0"}


def _checkpoint_manager() -> Any:
    from ray.train._internal.checkpoint_manager import _CheckpointManager

    return _CheckpointManager(checkpoint_config=None)


def _trial_table() -> Any:
    from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter

    return TuneTerminalReporter(AirVerbosity.DEFAULT, num_samples=1, metric="m", mode="max", config={})


PRIVATE_APIS = [
    PrivateApi(
        "ray",
        "ray.tune.experimental.output",
        "TuneTerminalReporter",
        "the study's calm trial table",
        _trial_table,
        ("_heartbeat_freq", "_inferred_metric", "setup", "print_heartbeat"),
    ),
    PrivateApi("ray", "ray.train._internal.session", "_TrainingResult", "a checkpoint Tune's bookkeeping knows"),
    PrivateApi(
        "ray",
        "ray.train._internal.checkpoint_manager",
        "_CheckpointManager",
        "a restored trial pointed at a checkpoint that exists",
        _checkpoint_manager,
        ("_latest_checkpoint_result", "_checkpoint_results"),
    ),
    PrivateApi("ray", "ray._raylet", "Config.initialize", "Ray reads RAY_AUTH_MODE again (token auth)"),
    PrivateApi("ray", "ray._raylet", "GcsClient", "a refused auth token said in one line"),
    PrivateApi(  # GcsClient hands its calls to this (its own `__getattr__`)
        "ray", "ray._raylet", "InnerGcsClient", "a refused auth token said in one line", attrs=("internal_kv_get",)
    ),
    PrivateApi(
        "ray",
        "ray._private.ray_logging",
        "global_worker_stdstream_dispatcher",
        "only the training workers' output forwarded",
        attrs=("handlers", "add_handler", "remove_handler"),
    ),
]


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


def reread_auth_mode() -> None:
    """Make this process read `RAY_AUTH_MODE` again (Ray reads it once); nothing on a Ray without."""
    try:
        from ray._raylet import Config  # type: ignore[attr-defined]  # compiled, no stubs

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


def gcs_client(address: str) -> Any | None:
    """A client of the cluster's GCS (one question before joining it); None on a Ray without."""
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled, no stubs
    except ImportError:
        return None
    return GcsClient(address=address)


def worker_output_dispatcher() -> Any | None:
    """Ray's dispatcher of the workers' stdout/stderr to the driver; None on a Ray without."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher
