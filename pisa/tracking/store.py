"""The MLflow store: runs, params, metrics and artifacts, written by one process at a time.

Runs are addressed by id through `MlflowClient` (no global "active run"), so the
same code serves a single training (logged from the Ray Train controller) and a
study (logged from the Tune driver: one parent run, one nested child per trial).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..core.errors import TrackingError
from ..core.uris import public_uri, redact
from .lineage import DatasetSummary, dataset_inputs, lineage_tags
from .mlflow_private import max_param_length, max_tag_length
from .sqlite_template import seed_store
from .tags import PARENT_RUN_ID, RunStatus

log = logging.getLogger(__name__)

NESTED_TAG = PARENT_RUN_ID


USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def _use_credentials(uri: str) -> str:
    """An http(s) URI with `user:password@` hands its credentials to MLflow the way MLflow
    reads them (the environment) and is used without them."""
    parsed = urlparse(uri)
    if parsed.scheme.startswith("http") and parsed.username:
        os.environ.setdefault(USERNAME_ENV, parsed.username)
        if parsed.password:
            os.environ.setdefault(PASSWORD_ENV, parsed.password)
        return public_uri(uri)
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when the tracking store can't be reached, or refuses
    the credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    uri = _use_credentials(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-given URI)
                if resp.status >= 400:
                    raise TrackingError(f"MLflow server {uri} answered {resp.status} on /health")
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`) or set tracking.uri / "
                f"MLFLOW_TRACKING_URI"
            ) from None
        _check_login(uri, timeout)
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is not None:
            parent = path.parent if str(path) else Path.cwd()
            if not parent.exists():
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise TrackingError(f"MLflow store {uri}: can't create {parent}: {exc}") from None
            if not os.access(parent, os.W_OK):
                raise TrackingError(f"MLflow store {uri}: {parent} is not writable")
    elif scheme in ("postgresql", "mysql", "mssql"):
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(
                uri, connect_args={"connect_timeout": int(timeout)} if scheme == "postgresql" else {}
            )
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:  # driver errors vary by backend
            raise TrackingError(f"MLflow database {redact(uri)} is not reachable: {exc}") from None
    elif scheme in ("", "file"):
        path = Path(parsed.path if scheme == "file" else uri)
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise TrackingError(f"MLflow store {uri} is not writable")
    else:
        raise TrackingError(f"unsupported MLflow tracking URI scheme {scheme!r} in {redact(uri)}")


def _check_login(uri: str, timeout: float) -> None:
    """A server with a login answers 401 without (or with wrong) credentials: say so now."""
    import base64

    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        # password hashing makes a login slower than /health: a longer wait
        with urllib.request.urlopen(request, timeout=max(timeout, 30.0)):  # noqa: S310 (user-given URI)
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            who = f"user {user!r}" if user else "no credentials"
            raise TrackingError(
                f"MLflow server {uri} refused {who} ({exc.code}); set {USERNAME_ENV} and {PASSWORD_ENV}"
            ) from None
    except (urllib.error.URLError, OSError):
        pass  # reachability was checked above; older servers may lack this endpoint


def tracker(uri: str) -> Tracker:
    """The process's `Tracker` of the store at `uri`: one per store, so one client and one
    database connection pool however many runs a process writes."""
    return _tracker_of(_use_credentials(uri))


@functools.lru_cache(maxsize=32)
def _tracker_of(uri: str) -> Tracker:
    from mlflow.tracking import MlflowClient

    # no "Downloading artifacts" progress bars on pisa's console (`pisa study best`, predict)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with _one_process_at_a_time(uri):
        # the first client of a new SQLite file creates its tables and runs MLflow's
        # migrations; two processes doing that at once (two `pisa train`s on a new store)
        # break each other's ("duplicate column name"). A new one is a copy of an empty one
        if uri.startswith("sqlite:///"):
            seed_store(Path(uri[len("sqlite:///") :].split("?")[0]))
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)
    return Tracker(uri, c)


@contextlib.contextmanager
def _one_process_at_a_time(uri: str):
    """An exclusive lock on a SQLite store's folder (`flock`, released when the block ends
    or the process dies); other stores need none."""
    folder = Path(uri[len("sqlite:///") :].split("?")[0]).parent if uri.startswith("sqlite:///") else None
    if folder is None or not folder.is_dir():
        yield
        return
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Tracker:
    """Runs, params, metrics, tags and artifacts in one MLflow store, through one client.

    Get it with `tracker(uri)`. What it writes follows MLflow's own limits: params and tags
    are cut at MLflow's maximum lengths, batches are split by MLflow's client, params that
    are URIs lose their credentials.

    The only door to MLflow above `pisa.tracking`: the layers above read and write runs through
    these methods, never through MLflow's client (`_client`, private to this package), whose
    model registry is this store too (without that MLflow falls back to the process-wide
    registry URI, which may be another database)."""

    def __init__(self, uri: str, mlflow_client: Any):
        self.uri = uri
        self._client = mlflow_client

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created (or restored from deletion) as needed."""
        c = self._client
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:///"):
            # keep artifacts next to the SQLite file, not in whatever directory a process runs in
            artifact_location = (
                Path(self.uri[len("sqlite:///") :].split("?")[0]).resolve().parent / "mlartifacts"
            ).as_uri()
        try:
            return c.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created concurrently
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(
        self,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """Create a run (nested under `parent_run_id` if given) with its lineage tags and params."""
        run_tags = {**lineage_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id:
            run_tags[NESTED_TAG] = parent_run_id
        run = self._client.create_run(self.experiment_id(experiment), run_name=run_name, tags=run_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow's client splits a batch into the chunks its stores accept
        self._client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric, finite-or-not entries of `metrics` at `step`."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step))
            for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self._client.log_batch(run_id, metrics=items)

    def log_datasets(self, run_id: str, data_cfg) -> list[DatasetSummary]:
        """Log the train and val annotation files of a `DataConfig` as the run's dataset inputs."""
        summaries, inputs = dataset_inputs(data_cfg)
        if inputs:
            try:
                self._client.log_inputs(run_id, datasets=inputs)
            except Exception as exc:  # lineage is worth a warning, never a lost run
                log.warning("dataset inputs not logged for run %s: %s", run_id, exc)
        return summaries

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client.log_text(run_id, text, artifact_file)

    def log_artifacts(self, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Log each file or folder of `paths` that exists."""
        for p in map(Path, paths):
            if p.is_dir():
                self._client.log_artifacts(run_id, str(p), artifact_path)
            elif p.exists():
                self._client.log_artifact(run_id, str(p), artifact_path)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Tag values cut at MLflow's own limit (a longer one would fail the whole call)."""
        limit = max_tag_length()
        for k, v in tags.items():
            self._client.set_tag(run_id, k, str(v)[:limit])

    def end_run(self, run_id: str, status: str = RunStatus.FINISHED) -> None:
        """status: FINISHED, FAILED or KILLED (MLflow's terminal states)."""
        self._client.set_terminated(run_id, str(status))

    def find_runs(self, experiment: str, filter_string: str = "", max_results: int = 1000) -> list:
        """The runs of experiment `experiment` that match `filter_string` (none if it doesn't exist)."""
        exp = self._client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return self._client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=max_results)

    def children(self, experiment: str, parent_run_id: str) -> list:
        """The runs nested under `parent_run_id`."""
        return self.find_runs(experiment, f"tags.`{NESTED_TAG}` = '{parent_run_id}'")

    def run(self, run_id: str) -> Any:
        """The run `run_id` as MLflow has it: `.info` (id, name, status, experiment) and `.data`
        (params, latest metrics, tags)."""
        return self._client.get_run(run_id)

    def find_run(self, run_id: str) -> Any | None:
        """The run `run_id` (deleted ones too: `.info.lifecycle_stage`), None if the store has
        no such run (never created, or purged after its deletion)."""
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def experiment_of(self, run_id: str) -> str:
        """The id of the experiment that holds run `run_id`."""
        return self.run(run_id).info.experiment_id

    def metric_history(self, run_id: str, key: str) -> list:
        """Every value run `run_id` logged of `key`, in the order MLflow keeps them (`.value`,
        `.step`, `.timestamp`)."""
        return list(self._client.get_metric_history(run_id, key))

    def update_status(self, run_id: str, status: RunStatus) -> None:
        """Set the run's MLflow status without ending it (RUNNING again: a resumed run)."""
        self._client.update_run(run_id, status=str(status))

    def delete_tag(self, run_id: str, key: str) -> None:
        self._client.delete_tag(run_id, key)

    def delete_run(self, run_id: str) -> None:
        self._client.delete_run(run_id)

    def download_artifact(self, run_id: str, path: str, dst_dir: str | Path) -> str:
        """Copy the run's artifact `path` (a file or a folder) into `dst_dir`; its local path."""
        return self._client.download_artifacts(run_id, path, str(dst_dir))

    def newest_runs(self, filter_string: str, max_results: int) -> list:
        """The runs of every experiment that match `filter_string`, newest first."""
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        return self._client.search_runs(
            experiments, filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]
        )

    def describe_model_version(self, model_name: str, version: str, description: str) -> None:
        self._client.update_model_version(model_name, version, description=description)

    def alias_model_version(self, model_name: str, version: str, alias: str, tags: Mapping[str, str]) -> None:
        """Point the registered model's `alias` at `version`, and tag that version."""
        self._client.set_registered_model_alias(model_name, alias, version)
        for k, v in tags.items():
            self._client.set_model_version_tag(model_name, version, k, v)


def _param_value(value: Any) -> str:
    """A param value MLflow accepts: URIs without credentials, cut at MLflow's own limit."""
    text = "None" if value is None else str(value)
    if "://" in text:
        text = public_uri(text)
    return text[: max_param_length()]
