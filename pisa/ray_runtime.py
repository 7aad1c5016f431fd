"""Starting or joining Ray the way every pisa command does: Ray Train v2, quiet or verbose
output, the dashboard on 127.0.0.1 only, and a fixed GCS port per local cluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .progress import say

DRIVER_RESOURCE = "pisa_trial_driver"

T = TypeVar("T")


def init_ray(
    address: str | None = None, num_cpus: int | None = None, verbose: bool = True, dashboard: bool = True
) -> None:
    """Start (or join) Ray. `verbose=False` keeps Ray's own output off the console: workers'
    output is not forwarded to the driver (Tune writes each trial's to its directory) and
    only Ray's warnings are shown. `dashboard=False` (nothing runs Ray Train) saves a local
    cluster the dashboard process."""
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        quiet_libraries()
    env = {
        "RAY_TRAIN_V2_ENABLED": "1",
        "PYTHONUNBUFFERED": "1",
        # Ray Train's print() patch logs even prints a library sends to a redirected
        # stdout (COCOeval's tables) and doubles the progress lines: keep plain print
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # slow machines need more than Ray's 60 s to start a worker process
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"),
    }
    os.environ.update(env)
    kwargs: dict[str, Any] = dict(
        address=address,
        log_to_driver=verbose,
        runtime_env={"env_vars": env},
        ignore_reinit_error=True,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    if address is None:
        # Ray Train's placement-group cleanup uses the state API, served by the dashboard
        # process; it listens on 127.0.0.1 only.
        kwargs["include_dashboard"] = dashboard
        kwargs["dashboard_host"] = "127.0.0.1"
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        kwargs["resources"] = {DRIVER_RESOURCE: 10_000}
        kwargs.pop("address")
        # Ray Train's placement-group cleaner finds its cluster by address; with another
        # local Ray instance on the machine (a second study, a notebook) that look-up is
        # ambiguous and placement groups leak. So fix the GCS port and tell every worker.
        from ray.util import get_node_ip_address
    for attempt in range(3):
        if address is None:
            port = free_port()
            os.environ["RAY_GCS_SERVER_PORT"] = str(port)
            kwargs["runtime_env"] = {"env_vars": {**env, "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}}
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:
            if attempt == 2 or not _worth_retrying(address, exc):
                raise
            say(
                "the local Ray node was slow to start; trying again"
                if address is None
                else f"the Ray Client server at {address} failed to start this session; trying again"
            )
            ray.shutdown()
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def init_ray_alongside(task: Callable[[], T], address: str | None = None, **init_kwargs: Any) -> T:
    """`init_ray` while `task` (parsing annotations, setting up a tracking store) runs in a
    thread, and `task`'s result. Ray's start-up mostly waits on its own processes, and these
    fixed costs are most of what a short training or a small study pays before it starts.
    If `task` fails, a Ray started here is stopped again and the error is raised."""
    import ray

    ray_was_running = ray.is_initialized()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pisa-prepare") as pool:
        prepared = pool.submit(task)
        try:
            init_ray(address, **init_kwargs)
        finally:
            error = prepared.exception()
    if error is not None:
        if not ray_was_running:
            ray.shutdown()
        raise error
    return prepared.result()


def _worth_retrying(address: str | None, exc: Exception) -> bool:
    """Start-up failures that a second try gets past: Ray gives a local node 30 s to register
    (a busy machine needs more), and a Ray Client server starts one process per session,
    which can die before it answers ("Initialization failure from server")."""
    if address is None:
        return "timed out during startup" in str(exc)
    return address.startswith("ray://") and isinstance(exc, ConnectionAbortedError)


def free_port() -> int:
    """A free port outside Ray's default worker port range (10002-19999)."""
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def quiet_libraries() -> None:
    """Warnings only from the libraries a study drives (Ray, MLflow's store migrations)."""
    # MLflow sets its logger's level from this when it is first imported, over any set here
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("ray", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import optuna  # its logger configures itself on first use: ask it

    optuna.logging.set_verbosity(optuna.logging.WARNING)


class _RayInfoFilter(logging.Filter):
    """Drops Ray's own records below WARNING. Ray Train logs every report (its whole metrics
    dict) from a logger named after its source file, outside the `ray` logger tree, so a
    level on `ray` does not reach it; the record's path does."""

    def __init__(self) -> None:
        super().__init__()
        import ray

        self._ray_dir = os.path.dirname(ray.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self._ray_dir)


def quiet_ray_train_worker() -> None:
    """On a Ray Train worker: keep Ray's INFO lines (process group set-up, each report,
    each checkpoint) off the console, where the driver forwards them beside pisa's own."""
    root = logging.getLogger()
    if not any(isinstance(f, _RayInfoFilter) for h in root.handlers for f in h.filters):
        ray_filter = _RayInfoFilter()
        for handler in root.handlers:
            handler.addFilter(ray_filter)
