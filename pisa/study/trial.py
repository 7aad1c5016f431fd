"""A study's trials as they run: the Tune trainable and what it trains, the marks that make a
retry fail at once or a finished trial report its end again, the driver's fault hook (tests),
and a trial's error as the driver's callbacks read it (its metrics: `pisa.core.epoch_report`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core import storage
from ..core.config import ExperimentConfig
from ..core.errors import BackboneLoadError, DataError, NonFiniteLossError, find_pisa_error, one_line
from ..core.progress import say
from ..training.ray_runtime import FAULTS_ENV
from . import trial_recovery
from .layout import FAILED_MARK, done_mark, trial_storage
from .loading import Study
from .seeds import fit_seeds

DRIVER_FAULTS_ENV = "PISA_DRIVER_FAULTS"  # the same for the study's driver (see driver_fault)
# errors that fail the same way on every restart: the trial is not retried
DETERMINISTIC_ERRORS = (NonFiniteLossError, DataError, BackboneLoadError)


def tune_space(study: Study) -> dict[str, Any]:
    """The search space as Tune domains: the Tuner's `param_space`."""
    return {key: dist.tune_domain() for key, dist in study.cfg.search_space.items()}


def trial_params(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in study.cfg.search_space if k in config}


def trains_in_trial(study: Study, seeds: int | None = None) -> bool:
    """Whether a trial of `seeds` seeds (default: the study's) trains in the Tune trial's own
    process: 1 worker and 1 seed; a point with several seeds drives one Ray Train run per seed."""
    seeds = study.cfg.seeds if seeds is None else seeds
    return study.cfg.trial_process == "auto" and study.cfg.resources_per_trial.workers == 1 and seeds == 1


def fit_in_trial(
    exp: ExperimentConfig,
    *,
    name: str,
    in_trial: bool,
    checkpoint_score: tuple[str, str],
    faults: dict[str, Any] | None = None,
) -> None:
    """Train one config inside a Tune trial, reporting every epoch to Tune: in the trial's own
    process (1 worker; a restarted trial resumes from its latest Tune checkpoint), or as a
    `TorchTrainer` named `name` (a restart resumes from that run's latest checkpoint)."""
    # torch and Ray Train: loaded where a trial trains, not by the driver that imports this module
    if in_trial:
        from ..training.engine import run_worker
        from ..training.session import TuneTrialSession

        run_worker(
            {"experiment": exp.model_dump(mode="json"), "faults": faults or {}}, TuneTrialSession(exp.train.use_gpu)
        )
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..training.engine import stopped_on
    from ..training.train import build_trainer

    trainer = build_trainer(
        exp, name=name, callbacks=[TuneReportCallback()], faults=faults, checkpoint_score=checkpoint_score
    )
    error = stopped_on(trainer.fit())
    if error is not None:
        raise error


def run_trial(config: dict[str, Any], study: Study) -> None:
    """Tune function trainable: train one point, reporting every epoch to Tune."""
    from ray import tune

    params = trial_params(study, config)
    exp = study.experiment(params)
    trial_id = tune.get_context().get_trial_id()
    exp = exp.model_copy(update={"storage_path": trial_storage(study)})
    final = trial_recovery.read_done_mark(done_mark(study, trial_id))
    if final is not None:  # it ended before a driver was lost: report its end, train nothing
        tune.report(final)
        return
    with failing_at_once_on_retry(storage.join(trial_storage(study), trial_id, FAILED_MARK)):
        if study.cfg.seeds > 1:
            fit_seeds(exp, trial_id, study.seeds(), study.cfg.metric)
            return
        fit_in_trial(
            exp,
            name=trial_id,
            in_trial=trains_in_trial(study),
            checkpoint_score=(study.cfg.metric, study.cfg.mode),
            faults=json.loads(os.environ.get(FAULTS_ENV) or "null"),
        )


def driver_fault(point: str) -> None:
    """Test-only: `PISA_DRIVER_FAULTS={"kill_at": "POINT:N"}` kills this driver with SIGKILL
    the Nth time it passes POINT (trial_complete, checkpoint, mlflow_write), a crash at a
    known place for the recovery tests."""
    spec = os.environ.get(DRIVER_FAULTS_ENV)
    if not spec:
        return
    where, _, count = json.loads(spec).get("kill_at", "").partition(":")
    if where != point:
        return
    _DRIVER_FAULT_COUNTS[point] = _DRIVER_FAULT_COUNTS.get(point, 0) + 1
    if _DRIVER_FAULT_COUNTS[point] == int(count or 1):
        import signal

        say(f"fault injection: killing the driver at {point} #{count or 1}")
        os.kill(os.getpid(), signal.SIGKILL)


_DRIVER_FAULT_COUNTS: dict[str, int] = {}


@contextlib.contextmanager
def failing_at_once_on_retry(mark: str) -> Iterator[None]:
    """Tune retries a failed trial whatever the error; one that failed deterministically (a
    non-finite loss, bad data, missing weights) would only fail again after the same work.
    Its error is kept at `mark`, and the retry fails with it at once."""
    if storage.exists(mark):
        text = storage.read_text(mark)
        try:
            kept = json.loads(text)
        except ValueError:  # a plain-text record, as an earlier version wrote it
            raise RuntimeError(text) from None
        kinds = {cls.__name__: cls for cls in DETERMINISTIC_ERRORS}
        raise kinds.get(kept["error"], RuntimeError)(kept["message"])
    try:
        yield
    except Exception as exc:
        found = find_pisa_error(exc)
        if isinstance(found, DETERMINISTIC_ERRORS):
            storage.write_text(mark, json.dumps({"error": type(found).__name__, "message": str(found)}))
        raise


def trial_error(trial) -> str:
    """One line on why a trial failed, from the exception Tune pickled for it."""
    error = None
    pickled = getattr(trial, "pickled_error_file", None)  # written locally before callbacks run
    if pickled and Path(pickled).exists():
        from ray import cloudpickle

        try:
            error = cloudpickle.loads(Path(pickled).read_bytes())
        except Exception:  # an error that can't be unpickled here: fall back to its text
            error = None
    if error is not None:
        return one_line(error)
    text = ""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        text = Path(path).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed"
