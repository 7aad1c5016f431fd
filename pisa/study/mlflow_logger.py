"""The study's MLflow runs, written from the Tune driver (the study's only MLflow writer): one
nested run per trial under the study's run, with its params, epochs, status and best checkpoint."""

from __future__ import annotations

import json
import math
from typing import Any

from ray.tune import Callback

from .. import tracking
from ..core import storage
from ..core.progress import say
from ..core.storage import CHECKPOINT_FILE
from ..tracking.lineage import SystemMetrics
from . import trial_recovery
from .layout import SEED_VALUES_TAG, TRIAL_TAG, done_mark
from .loading import Study
from .seeds import seed_key
from .trial import driver_fault, epoch_metrics, trial_error, trial_params


class MlflowStudyLogger(Callback):
    """Tune callback: a nested MLflow run per trial (params, per-epoch metrics, status,
    config, best checkpoint). Runs on the driver: the only MLflow writer of the study."""

    def __init__(self, study: Study, uri: str, parent_run_id: str):
        self.study = study
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.max_epochs = study.base_config.train.resolved().epochs
        self.runs: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.best: dict[str, tuple[float, str | None]] = {}
        self.system_metrics: dict[str, SystemMetrics] = {}
        self.logged_epochs: dict[str, int] = {}
        self.reconciled = True  # until `setup` (a fresh or a resumed experiment)

    @property
    def tracker(self) -> tracking.Tracker:
        """Looked up, not held: Tune pickles its callbacks with the experiment's state."""
        return tracking.tracker(self.uri)

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        for run in self.tracker.children(self.study.base_config.tracking.experiment, self.parent_run_id):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id:
                self.runs[trial_id] = run.info.run_id
                # epochs already in MLflow: a trial that continues from an older checkpoint
                # trains them again, and they are not logged twice
                self.logged_epochs[trial_id] = int(run.data.metrics.get("epoch", 0) or 0)
        self.reconciled = False

    def on_step_begin(self, iteration, trials, **info):
        """Once, before a resumed study starts any trial: point every restored trial at a
        checkpoint that exists (`pisa.study.trial_recovery`)."""
        if getattr(self, "reconciled", True):
            return
        self.reconciled = True
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                continue
            repair = trial_recovery.repair_restored_trial(
                trial, CHECKPOINT_FILE, self.logged_epochs.get(trial.trial_id, 0)
            )
            if repair is not None:
                say(repair.line())

    def _run_for(self, trial) -> str:
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:
            return run_id
        params = trial_params(self.study, trial.config)
        exp = self.study.experiment(params)
        flat = exp.flat_params()
        label = ", ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in params.items())
        run_id = self.tracker.start_run(
            exp.tracking.experiment,
            f"{trial.trial_id} {label}"[:250],
            params=flat,
            tags={
                TRIAL_TAG: trial.trial_id,
                "pisa.study": self.study.name,
                "pisa.kind": "trial",
                "pisa.status": "running",
                "pisa.searched": ",".join(params),
            },
            parent_run_id=self.parent_run_id,
        )
        self.tracker.log_text(run_id, exp.to_yaml(), "config.yaml")
        self.tracker.log_datasets(run_id, exp.data)
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        resumed = trial.trial_id in self.runs
        if resumed and storage.exists(done_mark(self.study, trial.trial_id)):
            return  # it ended before; it only reports that end again (see `trial.run_trial`)
        run_id = self._run_for(trial)
        c = self.tracker.client
        tags = c.get_run(run_id).data.tags
        if "pisa.error" in tags:  # a failed trial, retried
            c.delete_tag(run_id, "pisa.error")
        if tags.get("pisa.status") != "running":  # retried, or resumed after an interruption
            c.set_tag(run_id, "pisa.status", "running")
        c.update_run(run_id, status="RUNNING")
        self._stop_system_metrics(trial.trial_id)
        interval = float(self.study.base_config.tracking.system_metrics_interval_s or 0)
        self.system_metrics[trial.trial_id] = SystemMetrics(self.uri, run_id, interval, resume=resumed)

    def _stop_system_metrics(self, trial_id: str) -> None:
        monitor = self.system_metrics.pop(trial_id, None)
        if monitor is not None:
            monitor.stop()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch > self.logged_epochs.get(trial.trial_id, 0):
            self.tracker.log_metrics(run_id, epoch_metrics(result), step=epoch)
            self.logged_epochs[trial.trial_id] = epoch
            driver_fault("mlflow_write")
        self.last[trial.trial_id] = dict(result)
        value = result.get(self.study.cfg.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            sign = 1 if self.study.cfg.mode == "max" else -1
            best = self.best.get(trial.trial_id)
            if best is None or sign * value > sign * best[0]:
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
        run_id = self._run_for(trial)
        last = self.last.get(trial.trial_id, {})
        epochs = max(int(last.get("epoch", 0)), self.logged_epochs.get(trial.trial_id, 0))
        status = "finished" if epochs >= self.max_epochs else "stopped_early"
        tags = {"pisa.status": status, "pisa.epochs": epochs}
        if status == "stopped_early":
            tags["pisa.stopped_by"] = f"{self.study.cfg.scheduler.type} scheduler after epoch {epochs}"
        # the best epoch from MLflow's history: also right for a trial resumed mid-way
        history = [
            m.value
            for m in self.tracker.client.get_metric_history(run_id, self.study.cfg.metric)
            if math.isfinite(m.value)
        ]
        if history:
            value = max(history) if self.study.cfg.mode == "max" else min(history)
            tags[f"pisa.best_{self.study.cfg.metric}"] = f"{value:.6g}"
        if self.study.cfg.seeds > 1:
            tags[SEED_VALUES_TAG] = json.dumps(self._seed_values(run_id))
        best = self.best.get(trial.trial_id)
        if best is not None:
            self._log_checkpoint(run_id, best[1])
        self.tracker.set_tags(run_id, tags)
        self._stop_system_metrics(trial.trial_id)
        # before the run is closed: a driver lost after this point resumes without training
        # this trial again, whatever Tune's last snapshot says of it
        final = epoch_metrics(last) or epoch_metrics(dict(self.tracker.client.get_run(run_id).data.metrics))
        trial_recovery.write_done_mark(done_mark(self.study, trial.trial_id), final)
        self.tracker.end_run(run_id, "FINISHED")
        driver_fault("trial_complete")

    def _seed_values(self, run_id: str) -> dict[str, float]:
        """Each seed's metric at the epoch where the seed mean was best."""
        client = self.tracker.client
        metric, sign = self.study.cfg.metric, 1 if self.study.cfg.mode == "max" else -1
        mean = [m for m in client.get_metric_history(run_id, metric) if math.isfinite(m.value)]
        if not mean:
            return {}
        step = max(mean, key=lambda m: (sign * m.value, -m.step)).step
        out = {}
        for seed in self.study.seeds():
            for m in client.get_metric_history(run_id, seed_key(seed, metric)):
                if m.step == step:
                    out[str(seed)] = m.value
        return out

    def on_experiment_end(self, trials, **info):
        """Stop the system-metrics monitors. A driver killed between creating a trial's run and
        saving Tune's state leaves a run for a trial the resumed search never knew: remove it,
        one child run per trial."""
        for trial_id in list(self.system_metrics):
            self._stop_system_metrics(trial_id)
        known = {t.trial_id for t in trials}
        c = self.tracker.client
        for trial in trials:  # stopped by Ctrl-C or SIGTERM: not left RUNNING in MLflow
            run_id = self.runs.get(trial.trial_id)
            if trial.status not in ("TERMINATED", "ERROR") and run_id and c.get_run(run_id).info.status == "RUNNING":
                self.tracker.set_tags(run_id, {"pisa.status": "interrupted"})
                self.tracker.end_run(run_id, "KILLED")
        for run in self.tracker.children(self.study.base_config.tracking.experiment, self.parent_run_id):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id not in known and run.info.status == "RUNNING":
                say(
                    f"removing MLflow run {run.info.run_id} of trial {trial_id}, lost with "
                    f"the previous driver before it was saved (restarted as a new trial)"
                )
                c.delete_run(run.info.run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        message = trial_error(trial)
        self.tracker.set_tags(run_id, {"pisa.status": "failed", "pisa.error": message})
        self._stop_system_metrics(trial.trial_id)
        self.tracker.end_run(run_id, "FAILED")

    def _log_checkpoint(self, run_id: str, path: str | None) -> None:
        if not path or not self.study.base_config.tracking.log_checkpoint:
            return
        location = storage.location_of(path, self.study.base_config.storage_path)
        if not storage.exists(location):
            say(f"checkpoint {storage.display(location)} is gone; not logged to MLflow")
            return
        with storage.local_copy(location) as ckpt:
            files = [ckpt / CHECKPOINT_FILE, ckpt / "config.json"]
            if files[0].exists():
                self.tracker.log_artifacts(run_id, [f for f in files if f.exists()], "checkpoint")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
