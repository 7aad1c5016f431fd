"""A new SQLite store made from a copy of an empty one.

The first MLflow client of a new SQLite file creates its tables and runs every one of MLflow's
migrations: 5-9 s on 2 cores, paid by the first command in each new directory (and by every
test that makes a store). The empty store that leaves is the same for every store of one
MLflow release but for one row, the Default experiment, whose artifact location MLflow sets
from the working directory. So pisa keeps one empty store per MLflow release in its cache,
copies it to a new store's path and sets that row as MLflow would have
(`<cwd>/mlruns/0`, the creation time now). Anything unexpected (no cache, another schema)
leaves the store to MLflow, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "PISA_CACHE_DIR"


def cache_dir() -> Path:
    """`$PISA_CACHE_DIR`, else `$XDG_CACHE_HOME/pisa`, else `~/.cache/pisa`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pisa"


def seed_store(path: Path) -> bool:
    """Make the SQLite store at `path` (absent) from the cached empty one; False when it was
    left to MLflow (it exists, the cache cannot be used). Callers hold the store folder's lock."""
    if path.exists() or not path.parent.is_dir():
        return False
    try:
        template = _template()
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        shutil.copyfile(template, partial)
        try:
            _point_default_experiment_here(partial)
            os.link(partial, path)  # never over a store another process made meanwhile
        finally:
            partial.unlink(missing_ok=True)
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # MLflow makes it, slower
        log.debug("new store %s left to MLflow: %s", path, exc)
        return False


def _point_default_experiment_here(db: Path) -> None:
    """The one row that names a place: the Default experiment's artifacts, as MLflow writes them
    for a store opened from this working directory."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

    location = append_to_uri_path(resolve_uri_if_local(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH), "0")
    now = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        changed = con.execute(
            "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
            "WHERE experiment_id = 0 AND name = 'Default'",
            (location, now, now),
        ).rowcount
        if changed != 1 or con.execute("SELECT count(*) FROM experiments").fetchone()[0] != 1:
            raise ValueError("the cached store is not an empty one")


def _template() -> Path:
    """The cached empty store of this MLflow release, made (by MLflow) the first time."""
    import mlflow

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / f"mlflow-{mlflow.__version__}-empty.db"
    if template.exists():
        return template
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one process makes it; the others wait and copy
        if not template.exists():
            from mlflow.tracking import MlflowClient

            partial = folder / f".{template.name}.{os.getpid()}.partial"
            partial.unlink(missing_ok=True)
            uri = f"sqlite:///{partial}"
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
            os.replace(partial, template)
    finally:
        os.close(fd)
    return template
