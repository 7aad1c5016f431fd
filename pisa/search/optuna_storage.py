"""The study's own Optuna record: an RDB storage `optuna-dashboard` can open, with the
trials ASHA stopped told to Optuna as PRUNED.

Ray Tune's `OptunaSearch` tells Optuna COMPLETE for every trial that ends without an
error, so a trial ASHA stopped after its first epoch would count as if its epoch-1 AP
were final and TPE would learn from it as such. `PruningOptunaSearch` tells those PRUNED
with their per-epoch values as intermediate values (step = epoch, the last one included:
Tune hands a trial's final result to `on_trial_complete`, not `on_trial_result`), as an
Optuna pruner would have done.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlparse

from ray.tune.search.optuna import OptunaSearch

from ..core.private_api import PrivateApi
from .distinct import grid_size, until_distinct

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# The private API of Optuna and of Ray's Optuna searcher, touched here alone (ruff's SLF001 is
# off for this module): checked against these versions (the lock, constraints.txt), each use
# listed below and resolved on the installed libraries by tests/test_private_apis.py.
CHECKED_AGAINST = {"optuna": "5.1.0", "ray": "2.60.0"}


def _searcher() -> Any:
    return OptunaSearch(metric="m", mode="max")


PRIVATE_APIS = [
    PrivateApi(
        "optuna",
        "optuna.trial",
        "Trial",
        "a trial read back from its storage (its id, not its number)",
        lambda: _optuna_trial(),
        ("_trial_id",),
    ),
    PrivateApi(
        "optuna",
        "optuna.trial",
        "FrozenTrial",
        "a stale RUNNING trial told FAIL by its storage id",
        lambda: _frozen_trial(),
        ("_trial_id",),
    ),
    PrivateApi(
        "ray",
        "ray.tune.search.optuna",
        "OptunaSearch",
        "the Optuna trial and study behind a Tune trial",
        _searcher,
        ("_ot_trials", "_ot_study", "_completed_trials", "_metric", "_setup_study"),
    ),
]


def _frozen_trial() -> Any:
    import optuna

    return optuna.trial.create_trial(value=0.0)


def _optuna_trial() -> Any:
    import optuna

    return optuna.create_study().ask()


STORAGE_FILE = "optuna.db"


def default_storage_url(mlflow_uri: str, storage_path: str | Path) -> str | None:
    """optuna.db beside a SQLite MLflow store, else in a local `storage_path`; None if neither."""
    if mlflow_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(mlflow_uri[len('sqlite:///') :]).resolve().parent / STORAGE_FILE}"
    parsed = urlparse(str(storage_path))
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else str(storage_path)).resolve()
        return f"sqlite:///{path / STORAGE_FILE}"
    return None


def open_storage(url: str | None):
    """An `RDBStorage` for `url` (its directory made), or None for Optuna's in-memory one."""
    if not url:
        return None
    import optuna

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None
    )


class PruningOptunaSearch(OptunaSearch):
    """`OptunaSearch` that tells Optuna PRUNED for trials a scheduler stopped before `max_t`,
    or, racing (`max_seeds`), before their last seed."""

    def __init__(self, *args, time_attr: str = "epoch", max_t: int, max_seeds: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._time_attr = time_attr
        self._max_t = int(max_t)
        self._max_seeds = max_seeds

    def _setup_study(self, mode):
        """Ray's study set-up, and the metric named in the Optuna study (optuna-dashboard shows
        it instead of "Objective 0")."""
        super()._setup_study(mode)
        if self._ot_study is None or not isinstance(self._metric, str):
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an Optuna that calls the call experimental
                if self._ot_study.metric_names != [self._metric]:
                    self._ot_study.set_metric_names([self._metric])
        except Exception as exc:  # a name is a label: never worth a study
            log.warning("Optuna study's metric not named: %s", exc)

    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggestion, asked again while it repeats a point of a discrete space that a
        trial has trained or is training (`distinct`: told to Optuna without a training)."""
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        size = grid_size(self._space) if isinstance(self._space, dict) else None
        study = self._ot_study
        if config is None or ot_trial is None or size is None or study is None:
            return config

        def ask_again() -> optuna.Trial:
            del self._ot_trials[trial_id]  # Ray asks Optuna again for a trial id it has no trial of
            OptunaSearch.suggest(self, trial_id)
            return self._ot_trials[trial_id]

        if until_distinct(study, ot_trial, ask_again, size) is ot_trial:
            return config
        return super().suggest(trial_id)  # the kept trial's point, as Ray hands it over

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._report_intermediate(trial_id, result)

    def _report_intermediate(self, trial_id: str, result: dict[str, Any] | None) -> None:
        """The epoch's metric as an Optuna intermediate value, stepped by epoch."""
        ot_trial = self._ot_trials.get(trial_id)
        metric = cast(str, self._metric)
        if ot_trial is None or not result or metric not in result or self._time_attr not in result:
            return
        step = int(result[self._time_attr])
        if step in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
            return
        try:
            ot_trial.report(float(result[metric]), step)
        except Exception as exc:  # Optuna's bookkeeping must never cost a trial
            log.warning("epoch %s of %s not reported to Optuna: %s", step, trial_id, exc)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False):
        from optuna.trial import TrialState

        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and ot_trial.storage.get_trial(ot_trial._trial_id).state.is_finished():
            # told before a driver was lost, from a snapshot older than that: it stays as told
            self._completed_trials.add(trial_id)
            return
        if not error:
            self._report_intermediate(trial_id, result)

        stopped_at = (result or {}).get(self._time_attr)
        seeds = (result or {}).get("seeds")
        raced_out = self._max_seeds is not None and seeds is not None and int(seeds) < self._max_seeds
        early = (
            not error
            and stopped_at is not None
            and (int(stopped_at) < self._max_t or raced_out)
            and trial_id in self._ot_trials
            and trial_id not in self._completed_trials
        )
        if not early:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        try:
            ot_trial.set_user_attr("stopped_at_" + self._time_attr, int(cast(float, stopped_at)))
            if raced_out:
                ot_trial.set_user_attr("stopped_at_seeds", int(cast(float, seeds)))
            cast("optuna.Study", self._ot_study).tell(ot_trial, state=TrialState.PRUNED)
        except Exception as exc:  # e.g. a NaN intermediate value: Optuna's bookkeeping only
            log.warning("Optuna trial of %s not marked pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def fail_stale_trials(url: str | None, study_name: str) -> int:
    """Trials left RUNNING in the Optuna study by a driver that is gone, told FAIL (a new Tune
    run of the study would otherwise see them running for ever); how many."""
    if not url:
        return 0
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(url)
    try:
        ot_study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no Optuna study yet
        return 0
    stale = ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(stale)
