"""A study's Tune trainable: one point of the search space, on one seed or several."""

from __future__ import annotations

import json
import os
from typing import Any

from ..core import storage
from ..training.ray_runtime import FAULTS_ENV
from ..trials import recovery
from ..trials.fit import failing_at_once_on_retry, fit_in_trial
from ..trials.race import RACE_FILE, fit_race
from ..trials.seeds import fit_seeds
from .paths import done_mark, trial_storage
from .study import Study


def tune_space(study: Study) -> dict[str, Any]:
    """The search space as Tune domains: the Tuner's `param_space`."""
    return {key: dist.tune_domain() for key, dist in study.cfg.search_space.items()}


def trial_params(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in study.cfg.search_space if k in config}


def run_trial(config: dict[str, Any], study: Study) -> None:
    """Tune function trainable: train one point, reporting every epoch to Tune."""
    from ray import tune

    params = trial_params(study, config)
    exp = study.experiment(params)
    trial_id = tune.get_context().get_trial_id()
    exp = exp.model_copy(update={"storage_path": trial_storage(study)})
    final = recovery.read_done_mark(done_mark(study, trial_id))
    if final is not None:  # it ended before a driver was lost: report its end, train nothing
        tune.report(final)
        return
    with failing_at_once_on_retry(storage.join(trial_storage(study), trial_id, recovery.FAILED_MARK)):
        if (racing := study.cfg.racing) is not None:
            race_file = storage.join(trial_storage(study), trial_id, RACE_FILE)
            fit_race(exp, trial_id, study.seeds(), racing.min_seeds, study.cfg.metric, race_file)
            return
        if study.cfg.seeds > 1:
            fit_seeds(exp, trial_id, study.seeds(), study.cfg.metric)
            return
        fit_in_trial(
            exp,
            name=trial_id,
            in_trial=study.trains_in_trial(),
            checkpoint_score=(study.cfg.metric, study.cfg.mode),
            faults=json.loads(os.environ.get(FAULTS_ENV) or "null"),
        )
