"""One training inside a Tune trial, for a study's point or a grid's training alike: trained
in the trial's own process or as a `TorchTrainer`, a deterministic failure kept so that
Tune's retry fails at once, and a trial's error as the driver's callbacks read it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core import storage
from ..core.config import ExperimentConfig
from ..core.errors import BackboneLoadError, DataError, NonFiniteLossError, find_pisa_error, one_line

# errors that fail the same way on every restart: the trial is not retried
DETERMINISTIC_ERRORS = (NonFiniteLossError, DataError, BackboneLoadError)


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
    from ..training.engine import stopped_on
    from ..training.train import build_trainer

    trainer = build_trainer(
        exp, name=name, callbacks=[_tune_report_callback()], faults=faults, checkpoint_score=checkpoint_score
    )
    error = stopped_on(trainer.fit())
    if error is not None:
        raise error


def _tune_report_callback() -> Any:
    """Ray's `TuneReportCallback`, each result waited on until the trial's Tune side took it.

    Ray 2.60 passes a Train run's results to its Tune trial through a queue of one; when the
    run ends (its last epoch reported) before the trial's main thread took that last result, as
    when the driver is slow with the previous one (an MLflow store down for seconds), the
    function's end reaches Tune's own one-slot queue first and the main thread's put of the last
    result blocks for ever: the trial hangs RUNNING with its workers gone (benchmarks/chaos.py
    found it). Waiting here keeps the run from ending first."""
    import time

    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportTakenCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, metrics, checkpoint)
            while not self._training_actor_item_queue.empty():
                time.sleep(0.05)

    return ReportTakenCallback()


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
