"""What the Tune callbacks that give each trial an MLflow run (a study's trials, a training
grid's trainings) do alike, on the driver: one `TrainingRun` per trial, RUNNING again and
sampling the machine while the trial runs, each epoch's report logged once, the samplers
stopped when the trial or the experiment ends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from .. import tracking
from ..core.epoch_report import epoch_metrics
from ..tracking.run_writer import TrainingRun


class TrainingRunsCallback(Callback):
    """A Tune callback writing one `TrainingRun` per trial, nested under `parent_run_id`.

    A subclass says which key stands for a trial (`key`), creates its run (`_create_run`)
    and says how often to sample the machine (`_system_metrics_interval`)."""

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
