"""Starting or joining Ray the way every pisa command does: Ray Train v2, quiet or verbose
output, the dashboard on 127.0.0.1 only, and a fixed GCS port per local cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..core.errors import ClusterError
from ..core.progress import say
from . import ray_private, signals

DRIVER_RESOURCE = "pisa_trial_driver"

T = TypeVar("T")


# test-only fault injection (JSON, see pisa.training.faults): a trial reads it where it runs
# (pisa.trials.fit), so a driver joining a running cluster hands it over with the workers' environment
FAULTS_ENV = "PISA_FAULTS"
_CARRIED_ENV = (FAULTS_ENV,)


def _driver_and_worker_env() -> dict[str, str]:
    """Settings this process and every Ray worker it starts share."""
    return {
        **{key: os.environ[key] for key in _CARRIED_ENV if os.environ.get(key)},
        "RAY_TRAIN_V2_ENABLED": "1",
        "PYTHONUNBUFFERED": "1",
        # Ray Train's print() patch logs even prints a library sends to a redirected
        # stdout (COCOeval's tables) and doubles the progress lines: keep plain print
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # slow machines need more than Ray's 60 s to start a worker process
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"),
    }


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    verbose: bool = True,
    dashboard: bool = True,
    log_to_driver: bool | None = None,
) -> None:
    """Start (or join) Ray. `verbose=False` keeps Ray's own output off the console: workers'
    output is not forwarded to the driver (Tune writes each trial's to its directory, unless
    `log_to_driver`: `pisa train` forwards its workers' progress lines) and only Ray's
    warnings are shown. `dashboard=False` (nothing runs Ray Train) saves a local cluster the
    dashboard process."""
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        quiet_libraries()
    if address is not None:
        prepare_to_join(address)
    env = _driver_and_worker_env()
    os.environ.update(env)
    kwargs: dict[str, Any] = dict(
        address=address,
        log_to_driver=verbose if log_to_driver is None else log_to_driver,
        runtime_env={"env_vars": env},
        ignore_reinit_error=True,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    if address is not None and not address.startswith("ray://") and ":" in address:
        # a joined cluster's GCS told to every worker too: Ray Train's placement-group cleaner
        # finds its cluster by address, and a node running another Ray instance (as a local
        # one below) would leave it guessing; a killed trial's workers' CPUs then stay
        # reserved and its restart waits for ever
        kwargs["runtime_env"] = {"env_vars": {**env, "RAY_ADDRESS": address}}
    if address is None:
        # No idle workers started with the node: Ray starts one per CPU for the first driver,
        # with no runtime environment, and pisa's jobs carry one (`env_vars` above), so none is
        # ever used: each imports Ray and is ended (1-2 CPU-seconds a worker, 57 in the test
        # suite: benchmarks/RESULTS.md, "The suite's CPU by process"). Read by the raylet.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
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
            signals.reinstall()  # Ray's core installs its own SIGTERM handler, which ends the process
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


def prepare_to_join(address: str) -> None:
    """Before joining a cluster: its auth token if one is at hand, and a fast answer if the
    cluster refuses this process (Ray Client's `ray://` has no GCS to ask)."""
    use_auth_token_if_found(address)
    if not address.startswith("ray://"):
        check_gcs_reachable(address)


def find_auth_token() -> str | None:
    """Where a Ray auth token is for this process: `RAY_AUTH_TOKEN`, the file named by
    `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` (what `ray start` and a local `ray.init`
    write); None if nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), os.path.expanduser("~/.ray/auth_token")):
        if path and os.path.isfile(path) and os.path.getsize(path) > 0:
            return path
    return None


def use_auth_token_if_found(address: str) -> None:
    """A cluster started by `ray start --head` where a token exists runs with token auth,
    and every process joining it must send the token (`RAY_AUTH_MODE=token`). When the mode
    is not set and a token is at hand, use it: a cluster without auth ignores it."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    where = find_auth_token()
    if where is None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    logging.getLogger(__name__).info("joining %s with the Ray auth token from %s", address, where)
    ray_private.reread_auth_mode()  # Ray reads the mode once per process


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a moment: output written below Python's streams."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_gcs_reachable(address: str) -> None:
    """Ask the cluster's GCS one question before joining it, so that a refused token is one
    line and exit 2 in about a second, not Ray's 20 s of retries and a traceback."""
    from ray.exceptions import AuthenticationError

    try:
        with _stderr_silenced():  # Ray's C++ client logs the refusal there as well
            client = ray_private.gcs_client(address)
            if client is None:  # a Ray without it: ray.init reports what it finds
                return
            client.internal_kv_get(b"session_name", namespace=None, timeout=10)
    except AuthenticationError:
        token = find_auth_token()
        fix = (
            f"the token from {token} was refused: use the head's token (its ~/.ray/auth_token) in RAY_AUTH_TOKEN"
            if token and os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            else "set RAY_AUTH_TOKEN to the head's token (its ~/.ray/auth_token) and RAY_AUTH_MODE=token"
        )
        raise ClusterError(f"--address {address}: the Ray cluster needs token authentication; {fix}") from None
    except Exception:  # unreachable or slow: ray.init says so in its own words
        return


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


def forward_only_worker_output(actor_prefix: str = "RayTrainWorker") -> None:
    """Keep printing what the training workers print (pisa's progress lines, their errors)
    but not the output of Ray's own actors (the Train controller's retries and resource
    requests, "safe to ignore" tracebacks): it stays in the session's log files. Replaces
    the handler Ray's `log_to_driver` installs; a Ray without it is left as it is."""
    dispatcher = ray_private.worker_output_dispatcher()
    if dispatcher is None:
        return
    names = [name for name, _ in dispatcher.handlers]
    if "ray_print_logs" not in names:
        return
    original = dict(dispatcher.handlers)["ray_print_logs"]

    def from_workers(data: dict[str, Any]) -> None:
        if str(data.get("actor_name") or "").startswith(actor_prefix) or data.get("pid") == "raylet":
            original(data)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", from_workers)


def quiet_libraries() -> None:
    """Warnings only from the libraries a study drives (Ray, MLflow's store migrations)."""
    # MLflow sets its logger's level from this when it is first imported, over any set here
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Tune's experiment banner and TensorBoard hint: its new output engine prints them even
    # at verbose=0; the old one at verbosity 0 prints nothing (pisa's console says what runs)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Token authentication is enabled for this Ray cluster": said at every start where a
    # token exists (`pisa` uses it on purpose, see `use_auth_token_if_found`)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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
