"""`pisa study repair NAME`: a study's state (`pisa_study.json`) rebuilt from what survives it.

The state is a copy of what the study's own MLflow run holds: its `study.*` params (the
study file's settings as resolved: packing and `--set` items applied), its artifacts
`base_config.yaml` (the training config every trial starts from), `search_space.json` and
`study.yaml` (the file as written). What the run does not name, where it is, comes from:

- the damaged file itself: it is written top to bottom, so a file cut short keeps its
  first fields (the run's id, the store, the experiment, the study file, when it started);
- Tune's saved experiment (`tuner.pkl`), which holds the study's MLflow logger, so the
  store's URI and the run's id: read as a stream of pickle opcodes, never unpickled (it
  would run code and open the Optuna database);
- `--tracking-uri` / `--run-id`, and `MLFLOW_TRACKING_URI` or `./mlflow.db` last.

Among the stores found, the study's run is the newest run tagged `pisa.kind=study` and
`pisa.study=NAME` (the one the hints name, if any).
"""

from __future__ import annotations

import ast
import json
import os
import pickletools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import tracking
from ..core import storage
from ..core.errors import PisaError, StudyError
from ..core.uris import public_uri
from ..tracking import tags as tag
from ..tracking.tags import Kind
from .paths import STATE_FILE
from .schema import StudyConfig
from .state import DamagedStateError, StudyState, read_state, write_state
from .study import Study

PARAM_PREFIX = "study."  # the study's settings on its own run (`pisa.search.tuner.run_study`)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
EXTEND_RUN = re.compile(r"^extend-\d+$")  # `pisa study extend`'s Tune runs
TRACKING_SCHEMES = ("sqlite:", "http://", "https://", "postgresql", "mysql", "mssql", "file:", "databricks")


@dataclass
class Repaired:
    state: StudyState
    path: str
    was: str  # what the old file was: "damaged (...)" or "missing"

    def line(self) -> str:
        return (
            f"rebuilt the state of study {self.state.name!r} ({self.was}) from MLflow run "
            f"{self.state.parent_run_id} in {public_uri(self.state.tracking_uri)}: {storage.display(self.path)}"
        )


def repair_study(
    name: str,
    storage_path: str | Path = "ray_results",
    *,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> Repaired | None:
    """Rebuild study `name`'s state from its MLflow run; None when the state reads (nothing
    to repair). Raises `StudyError` (one line) when no folder or no run can be found."""
    folder = _folder(name, storage_path)
    was = "missing"
    hints: dict[str, Any] = {}
    if storage.exists(storage.join(folder, STATE_FILE)):
        try:
            read_state(folder)
            return None
        except DamagedStateError as exc:
            was = f"damaged: {exc.reason}"
        hints = _fields_of(_read_bytes(storage.join(folder, STATE_FILE)))
    study_name = folder.rstrip("/").rsplit("/", 1)[-1]
    uris, run_ids = _candidates(folder, hints, tracking_uri, run_id)
    uri, run = _find_run(study_name, uris, run_ids)
    state = _state_of(folder, study_name, uri, run, hints)
    path = storage.join(folder, STATE_FILE)
    write_state(state, path)
    state.dir = folder
    return Repaired(state, path, was)


def _folder(name: str, storage_path: str | Path) -> str:
    candidates = [storage.normalize(name), storage.join(storage.normalize(storage_path), name)]
    for c in candidates:
        if storage.exists(storage.join(c, STATE_FILE)) or storage.exists(storage.join(c, "tuner.pkl")):
            return c
    raise StudyError(
        f"no study {name!r} to repair: neither {STATE_FILE} nor Tune's tuner.pkl in "
        + ", ".join(storage.display(c) for c in candidates)
    )


def _read_bytes(location: str) -> bytes:
    try:
        return storage.read_bytes(location)
    except OSError:
        return b""


_FIELD = re.compile(rb'"(\w+)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|null|true|false)\s*[,}\n]')


def _fields_of(text: bytes) -> dict[str, Any]:
    """The top-level fields a state file cut short still holds (its simple values, not `resolved`)."""
    fields: dict[str, Any] = {}
    for key, value in _FIELD.findall(text.split(b'"resolved"', 1)[0]):
        try:
            fields.setdefault(key.decode(), json.loads(value))
        except ValueError:
            continue
    return fields


def _pickled_strings(data: bytes) -> list[str]:
    """The strings in a pickle, read as opcodes (nothing in it runs); those before any damage."""
    found = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in op.name:
                found.append(arg)
    except Exception:  # a pickle cut short: what was read so far
        pass
    return found


def _candidates(
    folder: str, hints: dict[str, Any], tracking_uri: str | None, run_id: str | None
) -> tuple[list[str], list[str]]:
    uris: list[str] = [tracking_uri] if tracking_uri else []
    run_ids: list[str] = [run_id] if run_id else []
    if isinstance(hints.get("tracking_uri"), str):
        uris.append(hints["tracking_uri"])
    if isinstance(hints.get("parent_run_id"), str):
        run_ids.append(hints["parent_run_id"])
    for tune_run in sorted(storage.list_dirs(folder)) if storage.exists(folder) else []:
        _from_tuner(storage.join(folder, tune_run, "tuner.pkl"), uris, run_ids)
    _from_tuner(storage.join(folder, "tuner.pkl"), uris, run_ids)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uris.append(os.environ["MLFLOW_TRACKING_URI"])
    uris.append(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    return list(dict.fromkeys(uris)), list(dict.fromkeys(run_ids))


def _from_tuner(location: str, uris: list[str], run_ids: list[str]) -> None:
    if not storage.exists(location):
        return
    for text in _pickled_strings(_read_bytes(location)):
        if RUN_ID.match(text):
            run_ids.append(text)
        elif text.startswith(TRACKING_SCHEMES) and not text.rstrip("/").endswith(("optuna.db", "/optuna")):
            uris.append(text)


def _find_run(name: str, uris: list[str], run_ids: list[str]) -> tuple[str, Any]:
    """The store and the study's own run: a hinted id that is the study's run, else the newest."""
    tried = []
    for uri in uris:
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
            continue  # never create an empty store while looking
        tried.append(public_uri(uri))
        try:
            runs = tracking.tracker(uri).newest_runs(
                f"tags.`{tag.KIND}` = '{Kind.STUDY}' and tags.`{tag.STUDY}` = '{name}'", max_results=50
            )
        except Exception:  # an unreachable or foreign store: the next one
            continue
        runs = [r for r in runs if r.info.lifecycle_stage != "deleted"]
        if not runs:
            continue
        hinted = [r for r in runs if r.info.run_id in run_ids]
        return uri, (hinted or runs)[0]
    raise StudyError(
        f"study {name!r}: no MLflow run of the study in "
        + (", ".join(tried) if tried else "any store found")
        + "; name its store with --tracking-uri (and its run with --run-id)"
    )


def _param_value(text: str) -> Any:
    """A param as the study's settings had it: numbers, None, booleans and lists back from
    their text, other strings as they are."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _artifact(uri: str, run_id: str, name: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pisa-repair-") as tmp:
        try:
            return Path(tracking.tracker(uri).download_artifact(run_id, name, tmp)).read_text()
        except Exception as exc:
            raise StudyError(f"MLflow run {run_id} has no readable {name} to rebuild the study from ({exc})") from None


def study_of_run(name: str, uri: str, run) -> Study:
    """The study as its run recorded it (see the module's docstring)."""
    run_id = run.info.run_id
    settings: dict[str, Any] = {}
    for key, value in run.data.params.items():
        if key.startswith(PARAM_PREFIX):
            _set(settings, key[len(PARAM_PREFIX) :], _param_value(value))
    settings["name"] = name
    settings["search_space"] = json.loads(_artifact(uri, run_id, "search_space.json"))
    try:
        written = yaml.safe_load(_artifact(uri, run_id, "study.yaml")) or {}
        settings["experiment"] = written.get("experiment") or {}
    except (StudyError, yaml.YAMLError, AttributeError):
        settings["experiment"] = {}
    base = yaml.safe_load(_artifact(uri, run_id, "base_config.yaml"))
    try:
        cfg = StudyConfig.model_validate(settings)
        return Study(cfg, base, Path(settings.get("base") or name)).with_tracking_uri(public_uri(uri))
    except (PisaError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise StudyError(
            f"study {name!r}: MLflow run {run_id}'s settings do not make a study ({first[0] if first else exc})"
        ) from None


def _state_of(folder: str, name: str, uri: str, run, hints: dict[str, Any]) -> StudyState:
    from .state import _redacted, optuna_url

    study = study_of_run(name, uri, run)
    source = hints.get("study_file")
    study.source = Path(source) if isinstance(source, str) else Path(f"{name}.yaml")
    version = hints.get("pisa_version") or run.data.tags.get(f"{tag.VERSION_PREFIX}pisa")
    # `pisa study extend`'s Tune runs in the study's folder, continued in order; the trials it
    # added are in the file's first fields (the run's params keep the study's first number)
    tune_runs = sorted(
        (
            d
            for d in storage.list_dirs(folder)
            if EXTEND_RUN.match(d) and storage.exists(storage.join(folder, d, "tuner.pkl"))
        ),
        key=lambda d: int(d.rsplit("-", 1)[1]),
    )
    if isinstance(hints.get("num_samples"), int) and hints["num_samples"] > study.cfg.num_samples:
        study = Study(
            study.cfg.model_copy(update={"num_samples": hints["num_samples"]}),
            study.base,
            study.source,
            study.overrides,
        )
    return StudyState(
        tune_runs=tune_runs,
        name=name,
        parent_run_id=run.info.run_id,
        tracking_uri=public_uri(uri),
        experiment=study.base_config.tracking.experiment,
        study_file=str(study.source),
        metric=study.cfg.metric,
        mode=study.cfg.mode,
        created=run.info.start_time / 1000 if run.info.start_time else float(hints.get("created") or 0.0),
        num_samples=study.cfg.num_samples,
        optuna_storage=public_uri(optuna_url(study, uri) or "") or None,
        storage_path=study.base_config.storage_path,
        resolved=_redacted(study.resolved()),
        pisa_version=version if isinstance(version, str) else None,
    )
