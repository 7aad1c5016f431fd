"""A study's bookkeeping, saved beside its trials when it starts and read back to resume,
rank, report or validate it without its study file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core import storage
from ..core.errors import StudyError
from ..core.uris import public_uri
from ..core.version import VERSION, check_written_by
from .paths import STATE_FILE, state_path, study_dir
from .study import Study, load_study


class StudyState(BaseModel):
    """A study's bookkeeping, saved beside its trials (`pisa_study.json`): where it logs,
    what it ranks by, and its resolved definition, so a resume needs neither the study
    file nor the `--set` items it was started with."""

    model_config = ConfigDict(extra="ignore")

    name: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    study_file: str
    metric: str
    mode: Literal["max", "min"]
    created: float
    num_samples: int
    optuna_storage: str | None = None
    storage_path: str | None = None
    resolved: dict[str, Any] | None = None  # absent in states of older versions
    pisa_version: str | None = None  # the pisa that started it; None: pisa < 0.2.0
    # the Tune runs `pisa study extend` added in the study's directory (`extend-1`, ...): a
    # resume continues the last one; empty: the study's own run, in the directory itself
    tune_runs: list[str] = Field(default_factory=list)
    warm_start_from: str | None = None  # `pisa study run --warm-start`: the study it started from
    dir: str = Field("", exclude=True)  # where it was found: not saved


def save_state(study: Study, parent_run_id: str, uri: str, warm_start_from: str | None = None) -> None:
    state = StudyState(
        name=study.name,
        parent_run_id=parent_run_id,
        tracking_uri=public_uri(uri),
        experiment=study.base_config.tracking.experiment,
        study_file=str(study.source),
        metric=study.cfg.metric,
        mode=study.cfg.mode,
        created=time.time(),
        num_samples=study.cfg.num_samples,
        optuna_storage=public_uri(optuna_url(study, uri) or "") or None,
        storage_path=study.base_config.storage_path,
        resolved=_redacted(study.resolved()),
        pisa_version=VERSION,
        warm_start_from=warm_start_from,
    )
    write_state(state, state_path(study))


def write_state(state: StudyState, path: str) -> None:
    storage.write_text(path, state.model_dump_json(indent=2))


def tune_dir(state: StudyState) -> str:
    """The Tune run a resume continues: the last one `pisa study extend` added, else the study's."""
    return storage.join(state.dir, state.tune_runs[-1]) if state.tune_runs else state.dir


def _redacted(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _redacted(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_redacted(v) for v in data]
    return public_uri(data) if isinstance(data, str) and "://" in data else data


def load_state(name_or_dir: str, storage_path: str | Path = "ray_results") -> StudyState:
    """The bookkeeping of a study by name (under `storage_path`) or by directory or URI."""
    candidates = [storage.normalize(name_or_dir), storage.join(storage.normalize(storage_path), name_or_dir)]
    for c in candidates:
        if storage.exists(storage.join(c, STATE_FILE)):
            state = read_state(c)
            state.dir = c
            return state
    raise StudyError(
        f"no study {name_or_dir!r}: looked for {STATE_FILE} in " + ", ".join(storage.display(c) for c in candidates)
    )


class DamagedStateError(StudyError):
    """A study's state file that is there but cannot be read (cut short, overwritten, not
    readable): the one line names the file, says why, and how to rebuild it."""

    def __init__(self, folder: str, reason: str):
        self.folder, self.reason = folder, reason
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        super().__init__(
            f"study {name!r}: its state {storage.display(storage.join(folder, STATE_FILE))} is damaged ({reason}); "
            f"rebuild it from MLflow with `pisa study repair {name}`"
        )


def read_state(folder: str) -> StudyState:
    """The state in a study's folder; `DamagedStateError` when its file cannot be read."""
    try:
        return StudyState.model_validate_json(storage.read_text(storage.join(folder, STATE_FILE)))
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedStateError(folder, _first_line(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise DamagedStateError(folder, f"{where + ': ' if where else ''}{first['msg']}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_resumable(state: StudyState) -> None:
    """Tune's saved state names pisa's classes by module path: only the release that started
    a study can continue it (`pisa.core.version`)."""
    check_written_by(
        state.pisa_version,
        f"study {state.name!r} ({storage.display(state.dir)})",
        "resume it with that version (pip install pisa==<version>), or start it again under a new name; "
        "`pisa study best` and `validate` still read it",
    )


def optuna_url(study: Study, uri: str) -> str | None:
    """The study's Optuna storage: the study file's, else beside the MLflow store."""
    from .optuna_storage import default_storage_url  # Optuna and Ray Tune: only when it is asked for

    return study.cfg.optuna_storage or default_storage_url(uri, study.base_config.storage_path)


def study_from_state(state: StudyState) -> Study:
    """The study as it was started (overrides included); from its file for older states."""
    if state.resolved is not None:
        # the store it started with, not today's default
        return Study.from_resolved(state.resolved).with_tracking_uri(state.tracking_uri)
    return load_study(state.study_file)


class PickledByStudyDir:
    """A Tune callback of a study, pickled with the experiment's state by its study's directory
    alone: the resume that unpickles it reloads the study from its state file (the study's
    own classes are never in Tune's pickle). Transient attributes (`_transient`) are dropped."""

    study: Study
    _transient: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "study" and k not in self._transient}
        state["_study_dir"] = study_dir(self.study)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        where = state.pop("_study_dir")
        self.__dict__.update(state)
        self.__dict__.update(dict.fromkeys(self._transient))
        self.study = study_from_state(load_state(where))
