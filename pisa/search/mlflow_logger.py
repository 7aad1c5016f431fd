"""The study's MLflow runs, written from the Tune driver (the study's only MLflow writer): one
nested run per trial under the study's run, with its params, epochs, status and best checkpoint."""

from __future__ import annotations

import json
import math
from typing import Any

from ..core import storage
from ..core.epoch_report import epoch_metrics
from ..core.progress import say
from ..tracking import tags as tag
from ..tracking.run_writer import TrainingRun
from ..tracking.tags import Kind, RunStatus, Status
from ..training.faults import driver_fault
from ..trials import recovery as trial_recovery
from ..trials.fit import trial_error
from ..trials.run_callback import TrainingRunsCallback
from ..trials.seeds import seed_key, seed_values
from .budget import stopped_by_budget
from .paths import done_mark
from .state import PickledByStudyDir
from .study import Study
from .trainable import trial_params


class MlflowStudyLogger(PickledByStudyDir, TrainingRunsCallback):
    """Tune callback: a nested MLflow run per trial (params, per-epoch metrics, status,
    config, best checkpoint). Runs on the driver: the only MLflow writer of the study.

    Its attributes are those an earlier version pickled into a study's Tune state (which a
    resume unpickles): `runs` (a `TrainingRun` per trial id), `last`, `best`, `reconciled`."""

    def __init__(self, study: Study, uri: str, parent_run_id: str):
        super().__init__(uri, parent_run_id)
        self.study = study
        self.max_epochs = study.base_config.train.resolved().epochs
        self.last: dict[str, dict[str, Any]] = {}
        self.best: dict[str, tuple[float, str | None]] = {}
        self.reconciled = True  # until `setup` (a fresh or a resumed experiment)

    def key(self, trial) -> str:
        return trial.trial_id

    def _experiment(self) -> str:
        return self.study.base_config.tracking.experiment

    def _key_of_run(self, run) -> str | None:
        return run.data.tags.get(tag.TRIAL) or None

    def _create_run(self, trial) -> TrainingRun:
        params = trial_params(self.study, trial.config)
        exp = self.study.experiment(params)
        label = ", ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in params.items())
        run = TrainingRun.start(
            self.uri,
            exp,
            f"{trial.trial_id} {label}"[:250],
            kind=Kind.TRIAL,
            tags={
                tag.TRIAL: trial.trial_id,
                tag.STUDY: self.study.name,
                tag.STATUS: Status.RUNNING,
                tag.SEARCHED: ",".join(params),
            },
            parent_run_id=self.parent_run_id,
        )
        run.log_config(exp)
        return run

    def _system_metrics_interval(self, trial) -> float | None:
        return self.study.base_config.tracking.system_metrics_interval_s

    def on_trial_start(self, iteration, trials, trial, **info):
        resumed = trial.trial_id in self.runs
        if resumed and storage.exists(done_mark(self.study, trial.trial_id)):
            return  # it ended before; it only reports that end again (see `trial.run_trial`)
        self._trial_started(trial, resumed=resumed, status_tag=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if self._log_result(trial, result, epoch):
            driver_fault("mlflow_write")
        self.last[trial.trial_id] = dict(result)
        value = result.get(self.study.cfg.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = self.best.get(trial.trial_id)
            if self.study.objective.better(value, None if best is None else best[0]):
                self.best[trial.trial_id] = (float(value), result.get("checkpoint_path"))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """A trial that trains in its own process reports its checkpoints to Tune itself:
        the one saved with the best result so far becomes that trial's best."""
        best = self.best.get(trial.trial_id)
        last = self.last.get(trial.trial_id, {})
        if best is not None and best[1] is None and last.get(self.study.cfg.metric) == best[0]:
            self.best[trial.trial_id] = (best[0], checkpoint.path)
        driver_fault("checkpoint")

    def on_trial_complete(self, iteration, trials, trial, **info):
        run = self._run_for(trial)
        last = self.last.get(trial.trial_id, {})
        epochs = max(int(last.get("epoch", 0)), run.logged_epoch)
        tags = self._final_tags(run, epochs, trial.trial_id)
        if self.study.cfg.racing is not None:
            tags.update(self._race_tags(last))
        best = self.best.get(trial.trial_id)
        if best is not None:
            self._log_checkpoint(run, best[1])
        run.set_tags(tags)
        run.stop_system_metrics()
        # before the run is closed: a driver lost after this point resumes without training
        # this trial again, whatever Tune's last snapshot says of it
        final = epoch_metrics(last) or epoch_metrics(dict(self.tracker.run(run.run_id).data.metrics))
        trial_recovery.write_done_mark(done_mark(self.study, trial.trial_id), dict(final))
        run.end(RunStatus.FINISHED)
        driver_fault("trial_complete")

    def _final_tags(self, run: TrainingRun, epochs: int, trial_id: str = "") -> dict[str, Any]:
        """A completed trial's status (finished, or stopped early by the scheduler), epochs,
        best value and, over several seeds, each seed's value at the best epoch."""
        status = Status.FINISHED if epochs >= self.max_epochs else Status.STOPPED_EARLY
        tags: dict[str, Any] = {tag.STATUS: status, tag.EPOCHS: epochs}
        if status == Status.STOPPED_EARLY:
            tags[tag.STOPPED_BY] = (
                f"budget spent after epoch {epochs}"
                if stopped_by_budget(self.parent_run_id, trial_id)
                else f"{self.study.cfg.scheduler.type} scheduler after epoch {epochs}"
            )
        # the best epoch from MLflow's history: also right for a trial resumed mid-way
        history = [
            m.value for m in self.tracker.metric_history(run.run_id, self.study.cfg.metric) if math.isfinite(m.value)
        ]
        value = self.study.objective.best(history)
        if value is not None:
            tags[tag.best(self.study.cfg.metric)] = tag.number(value)
        if self.study.cfg.seeds > 1:
            tags[tag.SEED_VALUES] = json.dumps(self._seed_values(run.run_id))
        return tags

    def _race_tags(self, last: dict[str, Any]) -> dict[str, Any]:
        """A raced point's value: its final-epoch mean over the seeds it trained (what the race
        compared), each seed's value, and, stopped before its last seed, that it was."""
        racing, metric = self.study.cfg.racing, self.study.cfg.metric
        assert racing is not None
        values = seed_values(last, metric)
        if not values:
            return {}
        tags: dict[str, Any] = {
            tag.best(metric): tag.number(sum(values.values()) / len(values)),
            tag.SEED_VALUES: json.dumps({str(s): v for s, v in sorted(values.items())}),
        }
        if len(values) < racing.max_seeds and int(last.get("epoch", 0)) >= self.max_epochs:
            tags[tag.STATUS] = Status.STOPPED_EARLY
            tags[tag.STOPPED_BY] = f"racing after {len(values)} of {racing.max_seeds} seeds"
        return tags

    def _seed_values(self, run_id: str) -> dict[str, float]:
        """Each seed's metric at the epoch where the seed mean was best."""
        metric = self.study.cfg.metric
        # the first epoch where the mean was best
        best = self.study.objective.best_of(
            sorted(self.tracker.metric_history(run_id, metric), key=lambda m: m.step), lambda m: m.value
        )
        if best is None:
            return {}
        step = best.step
        out = {}
        for seed in self.study.seeds():
            for m in self.tracker.metric_history(run_id, seed_key(seed, metric)):
                if m.step == step:
                    out[str(seed)] = m.value
        return out

    def on_experiment_end(self, trials, **info):
        """Stop the system-metrics monitors. A driver killed between creating a trial's run and
        saving Tune's state leaves a run for a trial the resumed search never knew: remove it,
        one child run per trial."""
        super().on_experiment_end(trials, **info)
        known = {t.trial_id for t in trials}
        for trial in trials:  # stopped by Ctrl-C or SIGTERM: not left RUNNING in MLflow
            # (a trial that ended has its run ended already; Tune calls a trial it stopped
            # on Ctrl-C TERMINATED too, so MLflow's status is what tells them apart)
            run = self.runs.get(trial.trial_id)
            if run is not None and self.tracker.run(run.run_id).info.status == RunStatus.RUNNING:
                run.end(RunStatus.KILLED, status=Status.INTERRUPTED)
        for found in self.tracker.children(self.study.base_config.tracking.experiment, self.parent_run_id):
            trial_id = found.data.tags.get(tag.TRIAL)
            if trial_id not in known and found.info.status == RunStatus.RUNNING:
                say(
                    f"removing MLflow run {found.info.run_id} of trial {trial_id}, lost with "
                    f"the previous driver before it was saved (restarted as a new trial)"
                )
                self.tracker.delete_run(found.info.run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._run_for(trial).end(RunStatus.FAILED, status=Status.FAILED, error=trial_error(trial))

    def _log_checkpoint(self, run: TrainingRun, path: str | None) -> None:
        if not path or not self.study.base_config.tracking.log_checkpoint:
            return
        location = storage.location_of(path, self.study.base_config.storage_path)
        if not storage.exists(location):
            say(f"checkpoint {storage.display(location)} is gone; not logged to MLflow")
            return
        with storage.local_copy(location) as ckpt:
            run.log_checkpoint(ckpt)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
