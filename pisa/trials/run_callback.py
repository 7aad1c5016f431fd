"""What the Tune callbacks that give each trial an MLflow run (a study's trials, a training
grid's trainings) do alike, on the driver: one `TrainingRun` per trial, RUNNING again and
sampling the machine while the trial runs, each epoch's report logged once, the samplers
stopped when the trial or the experiment ends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from .. import tracking
from ..core.checkpoint import CHECKPOINT_FILE
from ..core.epoch_report import epoch_metrics
from ..core.progress import say
from ..tracking.run_writer import TrainingRun
from . import recovery as trial_recovery

# the Tune statuses of a trial that has ended: it won't train again in this run
ENDED = (Trial.TERMINATED, Trial.ERROR)


class TrainingRunsCallback(Callback):
    """A Tune callback writing one `TrainingRun` per trial, nested under `parent_run_id`.

    A subclass says which key stands for a trial (`key`) and for an existing run
    (`_key_of_run`, in `_experiment`), creates its run (`_create_run`) and says how often to
    sample the machine (`_system_metrics_interval`)."""

    def __init__(self, uri: str, parent_run_id: str) -> None:
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.runs: dict[Any, TrainingRun] = {}

    @property
    def tracker(self) -> tracking.Tracker:
        """Looked up, not held: Tune pickles its callbacks with the experiment's state."""
        return tracking.tracker(self.uri)

    def key(self, trial) -> Any:
        raise NotImplementedError

    def _create_run(self, trial) -> TrainingRun:
        raise NotImplementedError

    def _experiment(self) -> str:
        raise NotImplementedError

    def _key_of_run(self, run) -> Any | None:
        """The trial key an existing MLflow child run belongs to, None if none."""
        raise NotImplementedError

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        """Fresh or resumed: the runs already in MLflow are kept, with the epochs they logged
        (a trial that continues from an older checkpoint trains them again, and they are not
        logged twice)."""
        for run in self.tracker.children(self._experiment(), self.parent_run_id):
            key = self._key_of_run(run)
            if key is not None:
                logged = int(run.data.metrics.get("epoch", 0) or 0)
                self.runs[key] = TrainingRun(self.uri, run.info.run_id, logged_epoch=logged)
        self.reconciled = False

    def on_step_begin(self, iteration, trials, **info):
        """Once, before a resumed experiment starts any trial: every restored trial pointed at
        a checkpoint that exists (`pisa.trials.recovery`)."""
        if getattr(self, "reconciled", True):
            return
        self.reconciled = True
        for trial in trials:
            if trial.status in ENDED:
                continue
            known = self.runs.get(self.key(trial))
            repair = trial_recovery.repair_restored_trial(
                trial, CHECKPOINT_FILE, known.logged_epoch if known is not None else 0
            )
            if repair is not None:
                say(repair.line())

    def _system_metrics_interval(self, trial) -> float | None:
        raise NotImplementedError

    def _run_for(self, trial) -> TrainingRun:
        """The trial's run, created (with its config and dataset inputs) the first time."""
        key = self.key(trial)
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = self._create_run(trial)
        return run

    def _trial_started(self, trial, *, resumed: bool, status_tag: bool) -> TrainingRun:
        """The trial (re)started: its run RUNNING again (see `TrainingRun.reopen`) and the
        machine sampled into it, continuing the steps of a `resumed` run."""
        run = self._run_for(trial)
        run.reopen(status_tag=status_tag)
        run.start_system_metrics(self._system_metrics_interval(trial), resume=resumed)
        return run

    def _log_result(self, trial, result: Mapping[str, Any], epoch: int) -> bool:
        """The training's own metrics of a Tune result at step `epoch`, unless logged already."""
        return self._run_for(trial).log_epoch(epoch_metrics(result), epoch)

    def _stop_system_metrics(self, trial) -> None:
        run = self.runs.get(self.key(trial))
        if run is not None:
            run.stop_system_metrics()

    def on_experiment_end(self, trials, **info):
        for run in self.runs.values():
            run.stop_system_metrics()
