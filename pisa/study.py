"""`pisa study`: a Ray Tune search over PISA's parameters, every trial tracked in MLflow.

A 1-worker trial trains in its Tune trial's own process (`TuneTrialSession`): no Ray
Train controller or worker group to start, and Tune reuses the trial actors, so the
next trial starts with torch already imported. A multi-worker trial is one Ray Train
run (a `TorchTrainer` fitted inside a Tune function trainable that holds no CPU
itself); `trial_process: ray_train` forces that path for every trial. Optuna's TPE proposes the points (the paper's
defaults first), ASHA stops weak trials by epoch, and a Tune callback on the driver
logs everything to MLflow: one parent run per study, one nested child run per trial,
so a SQLite store is only ever written by this one process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.tune import Callback

from . import lineage, storage, tracking, trial_recovery
from .config import ConfigError, ExperimentConfig, flatten
from .console import StudyConsole
from .errors import (
    BackboneLoadError,
    DataError,
    NonFiniteLossError,
    PisaError,
    StudyError,
    find_pisa_error,
    one_line,
)
from .progress import say
from .seeds import SEED_PREFIX, seed_key
from .study_config import Study, load_study
from .study_schema import Distribution

STATE_FILE = "pisa_study.json"
STATUS_EVERY_S = 120.0  # Tune's trial table on the console, at most this often
TRIAL_TAG = "pisa.trial_id"
SEED_VALUES_TAG = "pisa.seed_values"  # {seed: metric} of a multi-seed trial, at its best epoch
FAILED_MARK = "pisa_failed.txt"  # a trial that failed for a reason a restart can't fix
FAULTS_ENV = "PISA_FAULTS"  # fault injection for recovery tests (JSON, see engine)
DRIVER_FAULTS_ENV = "PISA_DRIVER_FAULTS"  # the same for the study's driver (see driver_fault)
# errors that fail the same way on every restart: the trial is not retried
DETERMINISTIC_ERRORS = (NonFiniteLossError, DataError, BackboneLoadError)


def trial_driver_resources() -> dict[str, float]:
    """The trainable only drives its TorchTrainer and must not hold a core the workers need.

    Tune refuses an empty request: on a local cluster it takes a slot of a custom resource
    that `init_ray` declares; on a user's cluster a sliver of a CPU.
    """
    import ray

    from .ray_runtime import DRIVER_RESOURCE

    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) >= 1:
        return {DRIVER_RESOURCE: 1}
    return {"CPU": 0.01}


@dataclass
class TrialSummary:
    run_id: str
    trial_id: str
    name: str
    status: str  # finished | stopped_early | failed | running
    metric: float | None
    epochs: int
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seed_values: dict[int, float] = field(default_factory=dict)  # empty for one seed per point


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialSummary]
    metric: str = "bbox_mAP"
    interrupted: bool = False
    # the searched fields' distributions, which read their logged (text) values back;
    # empty when the study's definition is not at hand
    search_space: dict[str, Distribution] = field(default_factory=dict)

    @property
    def all_failed(self) -> bool:
        return bool(self.trials) and all(t.status == "failed" for t in self.trials)

    def most_common_error(self) -> tuple[str, int]:
        """The error most failed trials ended with, and how many."""
        from collections import Counter

        errors = Counter(t.error or "unknown error" for t in self.trials if t.status == "failed")
        return errors.most_common(1)[0] if errors else ("", 0)

    @property
    def best(self) -> TrialSummary | None:
        ranked = [t for t in self.trials if t.metric is not None and t.status != "failed"]
        return ranked[0] if ranked else None


# ---------------------------------------------------------------- search space


def tune_space(study: Study) -> dict[str, Any]:

    return {key: dist.tune_domain() for key, dist in study.cfg.search_space.items()}


def study_dir(study: Study) -> str:
    """The study's directory: a local path or a URI (see `pisa.storage`)."""
    return storage.join(study.base_config.storage_path, study.name)


def trial_storage(study: Study) -> str:
    return storage.join(study_dir(study), "trials")


def trial_params(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in study.cfg.search_space if k in config}


# ---------------------------------------------------------------- the trainable


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
    if in_trial:
        from .engine import run_worker
        from .session import TuneTrialSession

        run_worker(
            {"experiment": exp.model_dump(mode="json"), "faults": faults or {}}, TuneTrialSession(exp.train.use_gpu)
        )
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from .engine import stopped_on
    from .train import build_trainer

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
            from .seeds import fit_seeds

            fit_seeds(exp, trial_id, study.seeds(), study.cfg.metric)
            return
        fit_in_trial(
            exp,
            name=trial_id,
            in_trial=trains_in_trial(study),
            checkpoint_score=(study.cfg.metric, study.cfg.mode),
            faults=json.loads(os.environ.get(FAULTS_ENV) or "null"),
        )


def done_mark(study: Study, trial_id: str) -> str:
    return storage.join(trial_storage(study), trial_id, trial_recovery.DONE_MARK)


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


# ---------------------------------------------------------------- MLflow, from the driver


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
        self.system_metrics: dict[str, lineage.SystemMetrics] = {}
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
        checkpoint that exists (`pisa.trial_recovery`)."""
        if getattr(self, "reconciled", True):
            return
        self.reconciled = True
        from .engine import CHECKPOINT_FILE

        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                continue
            repair = trial_recovery.repair_restored_trial(trial, CHECKPOINT_FILE)
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
        lineage.log_datasets(self.uri, run_id, exp.data)
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        resumed = trial.trial_id in self.runs
        if resumed and storage.exists(done_mark(self.study, trial.trial_id)):
            return  # it ended before; it only reports that end again (see run_trial)
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
        self.system_metrics[trial.trial_id] = lineage.SystemMetrics(self.uri, run_id, interval, resume=resumed)

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
        from .engine import CHECKPOINT_FILE

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


_REPORTED = {"epoch", "iteration", "lr", "images_per_sec", "time_train_s", "time_eval_s"}


def epoch_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The training's own metrics in a Tune result (not Tune's timers and counters)."""
    return {
        k: v
        for k, v in result.items()
        if k in _REPORTED or k.startswith(("bbox_", "segm_", "train_", "pisa_", SEED_PREFIX))
    }


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


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


# ---------------------------------------------------------------- running


def _state_path(study: Study) -> str:
    return storage.join(study_dir(study), STATE_FILE)


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
    dir: str = Field("", exclude=True)  # where it was found: not saved


def _save_state(study: Study, parent_run_id: str, uri: str) -> None:
    state = StudyState(
        name=study.name,
        parent_run_id=parent_run_id,
        tracking_uri=tracking.public_uri(uri),
        experiment=study.base_config.tracking.experiment,
        study_file=str(study.source),
        metric=study.cfg.metric,
        mode=study.cfg.mode,
        created=time.time(),
        num_samples=study.cfg.num_samples,
        optuna_storage=tracking.public_uri(optuna_url(study, uri) or "") or None,
        storage_path=study.base_config.storage_path,
        resolved=_redacted(study.resolved()),
    )
    storage.write_text(_state_path(study), state.model_dump_json(indent=2))


def _redacted(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _redacted(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_redacted(v) for v in data]
    return tracking.public_uri(data) if isinstance(data, str) and "://" in data else data


def load_state(name_or_dir: str, storage_path: str | Path = "ray_results") -> StudyState:
    """The bookkeeping of a study by name (under `storage_path`) or by directory or URI."""
    candidates = [storage.normalize(name_or_dir), storage.join(storage.normalize(storage_path), name_or_dir)]
    for c in candidates:
        if storage.exists(storage.join(c, STATE_FILE)):
            state = StudyState.model_validate_json(storage.read_text(storage.join(c, STATE_FILE)))
            state.dir = c
            return state
    raise StudyError(
        f"no study {name_or_dir!r}: looked for {STATE_FILE} in " + ", ".join(storage.display(c) for c in candidates)
    )


def optuna_url(study: Study, uri: str) -> str | None:
    """The study's Optuna storage: the study file's, else beside the MLflow store."""
    from .optuna_storage import default_storage_url

    return study.cfg.optuna_storage or default_storage_url(uri, study.base_config.storage_path)


def study_from_state(state: StudyState) -> Study:
    """The study as it was started (overrides included); from its file for older states."""
    if state.resolved is not None:
        # the store it started with, not today's default
        return Study.from_resolved(state.resolved).with_tracking_uri(state.tracking_uri)
    return load_study(state.study_file)


def trial_resources(study: Study, in_trial: bool | None = None) -> dict[str, float]:
    """A trial that trains in its own process holds its worker's CPUs (and GPU) itself."""
    if not (trains_in_trial(study) if in_trial is None else in_trial):
        return trial_driver_resources()
    res = study.cfg.resources_per_trial
    return {
        "CPU": res.cpus_per_worker,
        **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {}),
        **res.resources_per_worker,
    }


def _trainable(study: Study):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, study=study), trial_resources(study))


def check_trial_fits(study: Study, address: str | None) -> None:
    """One trial's training must fit the cluster, or the study would wait forever."""
    from .cluster import check_fits

    res = study.cfg.resources_per_trial
    per_worker = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker, **res.resources_per_worker}
    waiting = check_fits(
        res.workers,
        per_worker,
        address,
        f"{study.source}: resources_per_trial",
        hint="on CPUs: gpus_per_worker: 0; fewer workers: workers: N",
    )
    if waiting:
        say(waiting)


def training_footprint(study: Study) -> tuple[str, float]:
    """What one training of this study holds: ("GPU", GPUs) or ("CPU", CPUs), all workers."""
    res = study.cfg.resources_per_trial
    if res.gpus_per_worker > 0:
        return "GPU", res.workers * res.gpus_per_worker
    return "CPU", res.workers * res.cpus_per_worker


def trainings_that_fit(study: Study) -> int:
    """How many of this study's trainings the Ray cluster holds at once (0 if not one)."""
    import ray

    kind, per_training = training_footprint(study)
    return int(ray.cluster_resources().get(kind, 0) // max(per_training, 1e-9))


def concurrent_trials(study: Study) -> int:
    """How many trials run at once. A point with N seeds trains N runs side by side, so
    fewer points fit the cluster at a time; a point that cannot fit at all is an error
    (its seeds would wait for each other forever)."""
    cfg = study.cfg
    if cfg.seeds == 1:
        return cfg.max_concurrent_trials
    kind, per_training = training_footprint(study)
    fit = trainings_that_fit(study)
    if fit < cfg.seeds:
        raise ConfigError(
            f"{study.source}: seeds: {cfg.seeds} seeds x {cfg.resources_per_trial.workers} worker(s) train at "
            f"once and need {cfg.seeds * per_training:g} {kind}s; the Ray cluster has {fit * per_training:g}"
        )
    fits = min(cfg.max_concurrent_trials, fit // cfg.seeds)
    if fits < cfg.max_concurrent_trials:
        say(
            f"{fits} trial(s) at a time, not {cfg.max_concurrent_trials}: each trains {cfg.seeds} seeds "
            f"at once ({cfg.seeds * per_training:g} {kind}s) and the cluster fits {fit} trainings"
        )
    return fits


def _tuner(study: Study, uri: str, parent_run_id: str, verbose: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher

    from .optuna_storage import PruningOptunaSearch, open_storage

    cfg = study.cfg
    epochs = study.base_config.train.resolved().epochs
    searcher: Searcher = PruningOptunaSearch(
        points_to_evaluate=study.initial_points() or None,
        seed=cfg.seed,
        study_name=study.name,
        storage=open_storage(optuna_url(study, uri)),
        time_attr="epoch",
        max_t=epochs,
    )
    searcher = ConcurrencyLimiter(searcher, max_concurrent=concurrent_trials(study))
    if cfg.scheduler.type == "asha":
        scheduler: TrialScheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=min(cfg.scheduler.grace_period, epochs),
            reduction_factor=cfg.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    trainable = _trainable(study)
    return tune.Tuner(
        trainable,
        param_space=tune_space(study),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            # a reused trial actor has torch and the data loaded already
            reuse_actors=trains_in_trial(study),
        ),
        run_config=tune.RunConfig(
            name=study.name,
            storage_path=study.base_config.storage_path,
            # the logger is saved with the experiment: no credentials in it (they're in the env)
            callbacks=[
                MlflowStudyLogger(study, tracking.public_uri(uri), parent_run_id),
                StudyConsole(study, status_every_s=math.inf if verbose else STATUS_EVERY_S),
            ],
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # the best `keep_checkpoints` by the study's metric (and the latest, which Tune never
            # deletes): the best epoch's checkpoint is what MLflow and `--register` get
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=study.base_config.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.metric,
                checkpoint_score_order=cfg.mode,
            ),
            # each trial's stdout/stderr in its directory under the Ray results directory
            log_to_file=True,
            verbose=1 if verbose else 0,
        ),
    )


def run_study(study: Study, *, address: str | None = None, verbose: bool = False) -> StudyOutcome:
    """Run a study from the start; the tracking store is checked before any trial."""
    from .cluster import check_cluster_setup
    from .ray_runtime import quiet_libraries
    from .train import start_ray_with_data

    if not verbose:
        quiet_libraries()
    uri = study.base_config.tracking.resolved_uri()
    notes = check_cluster_setup(address, uri, study.base_config.storage_path, str(study.source))
    tracking.check_reachable(uri)
    if storage.exists(_state_path(study)) and storage.exists(storage.join(study_dir(study), "tuner.pkl")):
        raise StudyError(
            f"study {study.name!r} already exists in {storage.display(study_dir(study))}: continue it with "
            f"`pisa study resume {study.name}` or choose another name (--set name=...)"
        )
    start_ray_with_data(study.base_config, uri, address, verbose=verbose, dashboard=not trains_in_trial(study))
    check_trial_fits(study, address)
    concurrent_trials(study)  # a point that cannot fit the cluster fails before any run exists
    experiment = study.base_config.tracking.experiment
    parent = tracking.tracker(uri).start_run(
        experiment,
        f"study {study.name}",
        params={
            "study." + k: v
            for k, v in flatten(study.cfg.model_dump(mode="json", exclude={"experiment", "search_space"})).items()
        },
        tags={"pisa.kind": "study", "pisa.study": study.name},
    )
    tracking.tracker(uri).log_text(parent, study.source.read_text(), "study.yaml")
    tracking.tracker(uri).log_text(
        parent, json.dumps(study.cfg.model_dump(mode="json")["search_space"], indent=2), "search_space.json"
    )
    tracking.tracker(uri).log_text(parent, study.base_config.to_yaml(), "base_config.yaml")
    _save_state(study, parent, uri)
    _print_start(study, uri)
    for note in notes:
        say(f"note: {note}")
    tuner = _tuner(study, uri, parent, verbose)
    return _fit_and_finish(study, tuner, uri, parent)


def resume_study(
    name: str,
    *,
    storage_path: str | Path = "ray_results",
    address: str | None = None,
    retry_failed: bool = False,
    verbose: bool = False,
) -> StudyOutcome:
    """Continue an interrupted study as it was started (its `--set` overrides included):
    finished trials stay, unfinished ones restart from their last checkpoint, failed ones
    stay failed unless `retry_failed` (then they continue from their last checkpoint)."""
    from ray import tune

    from .cluster import check_cluster_setup
    from .ray_runtime import init_ray_alongside

    state = load_state(name, storage_path)
    study = study_from_state(state)
    uri = state.tracking_uri
    check_cluster_setup(address, uri, study.base_config.storage_path, storage.display(state.dir))
    tracking.check_reachable(uri)
    init_ray_alongside(lambda: tracking.client(uri), address, verbose=verbose, dashboard=not trains_in_trial(study))
    check_trial_fits(study, address)
    if retry_failed:  # their errors may have been fixed (data, a node); let them run again
        _clear_failed_marks(study)
    tracking.client(uri).update_run(state.parent_run_id, status="RUNNING")
    trainable = _trainable(study)
    tuner = tune.Tuner.restore(
        state.dir, trainable=trainable, resume_unfinished=True, resume_errored=retry_failed, restart_errored=False
    )
    say(
        f"resuming study {study.name} from {storage.display(state.dir)}"
        + (" (retrying failed trials)" if retry_failed else "")
    )
    return _fit_and_finish(study, tuner, uri, state.parent_run_id)


def _clear_failed_marks(study: Study) -> None:
    import pyarrow.fs as pafs

    root = trial_storage(study)
    if not storage.exists(root):
        return
    fs, path = storage._fs(root)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        if info.type == pafs.FileType.Directory:
            storage.delete(storage.join(root, info.base_name, FAILED_MARK))


def _print_start(study: Study, uri: str) -> None:
    cfg = study.cfg
    say(
        f"study {study.name}: {cfg.num_samples} trials, {cfg.max_concurrent_trials} at a time, "
        f"{cfg.scheduler.type} scheduler, metric {cfg.metric} ({cfg.mode})"
        f"{f' = mean over seeds {study.seeds()}' if cfg.seeds > 1 else ''}; "
        f"searching {', '.join(cfg.search_space)}"
    )
    say(f"MLflow: {tracking.redact(uri)}")
    say(f"storage: {storage.display(study_dir(study))}")
    url = optuna_url(study, uri)
    if url:
        shown = tracking.redact(url)
        say(f"Optuna: {shown}  (see it with `optuna-dashboard {shown}`)")


def _fit_and_finish(study: Study, tuner, uri: str, parent: str) -> StudyOutcome:
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    outcome = collect(study.name, uri, study.base_config.tracking.experiment, parent, study.cfg.metric, study.cfg.mode)
    outcome.search_space = dict(study.cfg.search_space)
    expected = study.cfg.num_samples
    done = [t for t in outcome.trials if t.status in ("finished", "stopped_early", "failed")]
    interrupted = interrupted or len(done) < expected
    outcome.interrupted = interrupted
    from .report import log_study_report

    try:
        log_study_report(outcome, study)
    except Exception as exc:  # a plot must never cost the study's results
        say(f"report skipped: {exc}")
    summarize_parent(uri, parent, outcome)
    if interrupted:
        tags, status = {"pisa.status": "interrupted"}, "KILLED"
    elif outcome.all_failed:
        error, count = outcome.most_common_error()
        tags = {
            "pisa.status": "failed",
            "pisa.error": f"all {len(outcome.trials)} trials failed; {count} with: {error}",
        }
        status = "FAILED"
    else:
        tags, status = {"pisa.status": "finished"}, "FINISHED"
    tracking.tracker(uri).set_tags(parent, tags)
    tracking.tracker(uri).end_run(parent, status)
    return outcome


def summarize_parent(uri: str, parent: str, outcome: StudyOutcome) -> None:
    """Put "what won" on the study's own run: the best value as a metric, the best trial's
    params as `best.*` tags, its run id as a tag, and a note linking to it."""
    best = outcome.best
    if best is None:
        return
    c = tracking.client(uri)
    experiment_id = c.get_run(parent).info.experiment_id
    tracking.tracker(uri).log_metrics(parent, {f"best_{outcome.metric}": best.metric}, step=0)
    tags = {
        "pisa.best_run_id": best.run_id,
        "pisa.best_trial": best.trial_id,
        f"pisa.best_{outcome.metric}": f"{best.metric:.6g}",
        **{f"best.{k}": v for k, v in best.params.items()},
    }
    params = ", ".join(f"`{k}` = {v}" for k, v in best.params.items())
    tags["mlflow.note.content"] = (
        f"**Best trial**: [{best.name or best.trial_id}](#/experiments/{experiment_id}/runs/{best.run_id}) "
        f"with {outcome.metric} = {best.metric:.4f} ({params}).\n\n"
        f"{sum(t.status != 'failed' for t in outcome.trials)} of {len(outcome.trials)} trials ran; "
        f"use it with `pisa study best {outcome.name} --register`."
    )
    tracking.tracker(uri).set_tags(parent, tags)
    try:  # params are write-once: a resumed study with a new winner keeps the tags only
        tracking.tracker(uri).log_params(parent, {f"best.{k}": v for k, v in best.params.items()})
    except Exception:
        pass


@dataclass
class StudyListing:
    """One line of `pisa study list`."""

    name: str
    status: str
    trials_done: int
    trials_failed: int
    num_samples: int | None
    metric: str
    best: float | None
    tracking_uri: str


def list_studies(storage_path: str | Path = "ray_results") -> list[StudyListing]:
    """The studies under `storage_path` (one directory each), newest first, read from MLflow."""
    root = Path(storage_path)
    if not root.is_dir():
        raise StudyError(f"no study storage at {root}")
    states: list[StudyState] = []
    for path in root.glob(f"*/{STATE_FILE}"):
        try:
            states.append(StudyState.model_validate_json(path.read_text()))
        except (OSError, ValueError):  # not a study's state (pydantic's errors are ValueErrors)
            continue
    states.sort(key=lambda st: st.created, reverse=True)
    out = []
    for st in states:
        uri, parent = st.tracking_uri, st.parent_run_id
        try:
            run = tracking.client(uri).get_run(parent)
            status = (
                "running"
                if run.info.status == "RUNNING"
                else run.data.tags.get("pisa.status") or run.info.status.lower()
            )
            outcome = collect(st.name, uri, st.experiment, parent, st.metric, st.mode)
            done = [t for t in outcome.trials if t.status in ("finished", "stopped_early", "failed")]
            failed = sum(t.status == "failed" for t in outcome.trials)
            best = outcome.best.metric if outcome.best else None
        except Exception as exc:  # an unreachable store must not hide the other studies
            status, done, failed, best = f"unknown ({type(exc).__name__})", [], 0, None
        out.append(StudyListing(st.name, status, len(done), failed, st.num_samples, st.metric, best, uri))
    return out


def collect(name: str, uri: str, experiment: str, parent: str, metric: str, mode: str) -> StudyOutcome:
    """The study's trials from MLflow, best first."""
    runs = tracking.tracker(uri).children(experiment, parent)
    trials = []
    for run in runs:
        tags = run.data.tags
        searched = [k for k in tags.get("pisa.searched", "").split(",") if k]
        best = tags.get(f"pisa.best_{metric}")
        value = float(best) if best is not None else run.data.metrics.get(metric)
        status = tags.get("pisa.status", "running")
        trials.append(
            TrialSummary(
                run_id=run.info.run_id,
                trial_id=tags.get(TRIAL_TAG, ""),
                name=run.info.run_name or "",
                status=status,
                metric=value,
                epochs=int(float(tags.get("pisa.epochs", run.data.metrics.get("epoch", 0) or 0))),
                params={k: run.data.params.get(k) for k in searched},
                error=tags.get("pisa.error"),
                seed_values={int(k): float(v) for k, v in json.loads(tags.get(SEED_VALUES_TAG, "{}")).items()},
            )
        )
    sign = -1 if mode == "max" else 1
    trials.sort(
        key=lambda t: (t.status == "failed", t.metric is None, sign * (t.metric if t.metric is not None else 0.0))
    )
    return StudyOutcome(name, parent, uri, trials, metric)


def outcome_from_state(name: str, storage_path: str | Path = "ray_results") -> StudyOutcome:
    state = load_state(name, storage_path)
    outcome = collect(
        state.name,
        state.tracking_uri,
        state.experiment,
        state.parent_run_id,
        state.metric,
        state.mode,
    )
    try:
        outcome.search_space = dict(study_from_state(state).cfg.search_space)
    except (PisaError, OSError):  # an older state whose study file is gone: values shown as logged
        pass
    return outcome
