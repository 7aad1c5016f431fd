"""`pisa study extend NAME --add N`: N more trials for a finished or interrupted study.

Tune cannot restore an experiment with a new `num_samples`, so the new trials are a new Tune
run in the study's own directory (`extend-1`, `extend-2`, ...) that shares the study's Optuna
study (its sampler learns from every trial before) and its MLflow run (the new trials are
nested there beside the old ones, which stay as they are). A trial the interrupted study left
unfinished stays interrupted in MLflow and failed in Optuna, and a new trial takes its place:
the study ends with its old `num_samples` + N trials done. `pisa study resume NAME` continues
the last run, as after `run`.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import tracking
from ..core import storage
from ..core.errors import ConfigError
from ..core.progress import say
from ..tracking import tags as tag
from ..tracking.tags import RunStatus, Status
from .optuna_storage import fail_stale_trials
from .paths import state_path
from .results import StudyOutcome, collect
from .state import optuna_url, write_state
from .study import Study
from .tuner import _budget_spec, _capacity, _fit_and_finish, _tuner, log_plan, reopen_study


def check_add(add: int) -> None:
    if add < 1:
        raise ConfigError(f"--add: {add} is not a number of trials to add (1 or more)")


def extend_study(
    name: str,
    add: int,
    *,
    storage_path: str | Path = "ray_results",
    address: str | None = None,
    verbose: bool = False,
) -> StudyOutcome:
    check_add(add)
    started = time.time()
    state, old = reopen_study(name, storage_path, address, verbose)
    uri = state.tracking_uri
    before = collect(state.name, uri, state.experiment, state.parent_run_id, state.metric, state.mode)
    done = [t for t in before.trials if t.status in tag.DONE]
    total = state.num_samples + add
    study = Study(old.cfg.model_copy(update={"num_samples": total}), old.base, old.source, old.overrides)
    _close_unfinished(uri, state.experiment, state.parent_run_id)
    stale = fail_stale_trials(optuna_url(study, uri), study.name)
    run_dir = f"extend-{len(state.tune_runs) + 1}"
    # the study's definition, total and new run saved first: a kill from here on is resumed
    state.num_samples = total
    state.resolved = {**(state.resolved or study.resolved()), "study": study.cfg.model_dump(mode="json")}
    state.tune_runs = [*state.tune_runs, run_dir]
    write_state(state, state_path(study))
    tracking.tracker(uri).update_status(state.parent_run_id, RunStatus.RUNNING)
    tracking.tracker(uri).set_tags(state.parent_run_id, {tag.STATUS: Status.RUNNING})
    samples = total - len(done)
    say(
        f"extending study {study.name}: {add} more trial(s), {len(done)} done before, {total} in all "
        f"({samples} to run in {storage.display(storage.join(state.dir, run_dir))}); same Optuna study and "
        f"MLflow run {state.parent_run_id}"
        + (f"; {stale} trial(s) the interrupted run left in Optuna marked failed" if stale else "")
    )
    # the extended study's plan (all its trials) replaces the one it started with
    plan = log_plan(study, uri, state.parent_run_id)
    capacity = _capacity(study)
    budget = _budget_spec(study, uri, state.parent_run_id, plan)
    tuner = _tuner(
        study,
        capacity,
        uri,
        state.parent_run_id,
        verbose,
        budget,
        points=[],
        samples=samples,
        run_dir=run_dir,
        done_before=len(done),
    )
    return _fit_and_finish(study, tuner, uri, state.parent_run_id, budget, started)


def _close_unfinished(uri: str, experiment: str, parent: str) -> None:
    """A killed driver's trial runs left RUNNING: ended as interrupted (the new run's logger
    would take them for runs it lost itself)."""
    store = tracking.tracker(uri)
    for run in store.children(experiment, parent):
        if run.info.status == RunStatus.RUNNING:
            store.set_tags(run.info.run_id, {tag.STATUS: Status.INTERRUPTED})
            store.end_run(run.info.run_id, RunStatus.KILLED)
