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

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from . import tracking
from .config import Choice, IntRange, LogUniform, flatten
from .console import StudyConsole
from .study_config import Study, load_study

STATE_FILE = "pisa_study.json"
STATUS_EVERY_S = 120.0  # Tune's trial table on the console, at most this often
TRIAL_TAG = "pisa.trial_id"



def trial_driver_resources() -> dict[str, float]:
    """The trainable only drives its TorchTrainer and must not hold a core the workers need.

    Tune refuses an empty request: on a local cluster it takes a slot of a custom resource
    that `init_ray` declares; on a user's cluster a sliver of a CPU.
    """
    import ray

    from .train import DRIVER_RESOURCE

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


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialSummary]
    metric: str = "bbox_mAP"
    interrupted: bool = False

    @property
    def best(self) -> TrialSummary | None:
        ranked = [t for t in self.trials if t.metric is not None and t.status != "failed"]
        return ranked[0] if ranked else None


# ---------------------------------------------------------------- search space


def tune_space(study: Study) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, d in study.cfg.search_space.items():
        if isinstance(d, Choice):
            space[key] = tune.choice(d.values)
        elif isinstance(d, IntRange):
            space[key] = tune.randint(d.low, d.high + 1)
        elif isinstance(d, LogUniform):
            space[key] = tune.loguniform(d.low, d.high)
        else:
            space[key] = tune.uniform(d.low, d.high)
    return space


def study_dir(study: Study) -> Path:
    return Path(study.base["storage_path"]) / study.name


def trial_params(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in study.cfg.search_space if k in config}


# ---------------------------------------------------------------- the trainable


def trains_in_trial(study: Study) -> bool:
    """Whether the study's trials train in the Tune trial's own process (1 worker each)."""
    return study.cfg.trial_process == "auto" and study.cfg.resources_per_trial.workers == 1


def run_trial(config: dict[str, Any], study: Study) -> None:
    """Tune function trainable: train one point, reporting every epoch to Tune."""
    from ray import tune

    params = trial_params(study, config)
    exp = study.experiment(params)
    if trains_in_trial(study):
        from .engine import run_worker
        from .session import TuneTrialSession

        run_worker({"experiment": exp.model_dump(mode="json")}, TuneTrialSession(exp.train.use_gpu))
        return

    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import build_trainer

    trial_id = tune.get_context().get_trial_id()
    exp = exp.model_copy(update={"storage_path": study_dir(study) / "trials"})
    # same name on a restart: Ray Train resumes from this trial's latest checkpoint
    trainer = build_trainer(exp, name=trial_id, callbacks=[TuneReportCallback()])
    trainer.fit()


# ---------------------------------------------------------------- MLflow, from the driver


class MlflowStudyLogger(Callback):
    """Tune callback: a nested MLflow run per trial (params, per-epoch metrics, status,
    config, best checkpoint). Runs on the driver: the only MLflow writer of the study."""

    def __init__(self, study: Study, uri: str, parent_run_id: str):
        self.study = study
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.max_epochs = int(study.experiment({}).train.resolved()["epochs"])
        self.runs: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.best: dict[str, tuple[float, str | None]] = {}

    def setup(self, **info):
        for run in tracking.find_runs(self.uri, self.study.base["tracking"]["experiment"],
                                      f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id:
                self.runs[trial_id] = run.info.run_id

    def _run_for(self, trial) -> str:
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:
            return run_id
        params = trial_params(self.study, trial.config)
        exp = self.study.experiment(params)
        flat = exp.flat_params()
        label = ", ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in params.items())
        run_id = tracking.start_run(
            self.uri, exp.tracking.experiment, f"{trial.trial_id} {label}"[:250], params=flat,
            tags={TRIAL_TAG: trial.trial_id, "pisa.study": self.study.name, "pisa.kind": "trial",
                  "pisa.status": "running", "pisa.searched": ",".join(params)},
            parent_run_id=self.parent_run_id,
        )
        from .train import config_yaml

        tracking.log_text(self.uri, run_id, config_yaml(exp), "config.yaml")
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        tracking.client(self.uri).update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = {k: v for k, v in result.items() if k in _REPORTED or k.startswith(("bbox_", "segm_", "train_", "pisa_"))}
        tracking.log_metrics(self.uri, run_id, metrics, step=epoch)
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

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        last = self.last.get(trial.trial_id, {})
        epochs = int(last.get("epoch", 0))
        status = "finished" if epochs >= self.max_epochs else "stopped_early"
        tags = {"pisa.status": status, "pisa.epochs": epochs}
        if status == "stopped_early":
            tags["pisa.stopped_by"] = f"{self.study.cfg.scheduler.type} scheduler after epoch {epochs}"
        # the best epoch from MLflow's history: also right for a trial resumed mid-way
        history = [m.value for m in tracking.client(self.uri).get_metric_history(run_id, self.study.cfg.metric)
                   if math.isfinite(m.value)]
        if history:
            value = max(history) if self.study.cfg.mode == "max" else min(history)
            tags[f"pisa.best_{self.study.cfg.metric}"] = f"{value:.6g}"
        best = self.best.get(trial.trial_id)
        if best is not None:
            self._log_checkpoint(run_id, best[1])
        tracking.set_tags(self.uri, run_id, tags)
        tracking.end_run(self.uri, run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        message = _trial_error(trial)
        tracking.set_tags(self.uri, run_id, {"pisa.status": "failed", "pisa.error": message})
        tracking.end_run(self.uri, run_id, "FAILED")

    def _log_checkpoint(self, run_id: str, path: str | None) -> None:
        from .engine import CHECKPOINT_FILE

        if not path or not self.study.base["tracking"].get("log_checkpoint", True):
            return
        ckpt = Path(path)
        files = [ckpt / CHECKPOINT_FILE, ckpt / "config.json"]
        if files[0].exists():
            tracking.log_artifacts(self.uri, run_id, [f for f in files if f.exists()], "checkpoint")


_REPORTED = {"epoch", "iteration", "lr", "images_per_sec", "time_train_s", "time_eval_s"}


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _trial_error(trial) -> str:
    from .train import root_message

    text = ""
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    if path and Path(path).exists():
        text = Path(path).read_text()
    if not text:
        text = str(getattr(trial, "error_msg", "") or "trial failed")
    return root_message(text)


# ---------------------------------------------------------------- running


def _state_path(study: Study) -> Path:
    return study_dir(study) / STATE_FILE


def _save_state(study: Study, parent_run_id: str, uri: str) -> None:
    path = _state_path(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "name": study.name, "parent_run_id": parent_run_id, "tracking_uri": uri,
        "experiment": study.base["tracking"]["experiment"], "study_file": str(study.source),
        "metric": study.cfg.metric, "mode": study.cfg.mode, "created": time.time(),
    }, indent=2))


def load_state(name_or_dir: str, storage_path: str | Path = "ray_results") -> dict[str, Any]:
    """The bookkeeping of a study by name (under `storage_path`) or by directory."""
    candidates = [Path(name_or_dir), Path(storage_path) / name_or_dir]
    for c in candidates:
        if (c / STATE_FILE).exists():
            state = json.loads((c / STATE_FILE).read_text())
            state["dir"] = str(c.resolve())
            return state
    raise FileNotFoundError(
        f"no study {name_or_dir!r}: looked for {STATE_FILE} in " + ", ".join(str(c) for c in candidates)
    )


def trial_resources(study: Study) -> dict[str, float]:
    """A trial that trains in its own process holds its worker's CPUs (and GPU) itself."""
    if not trains_in_trial(study):
        return trial_driver_resources()
    res = study.cfg.resources_per_trial
    return {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}


def _trainable(study: Study):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, study=study), trial_resources(study))


def _tuner(study: Study, uri: str, parent_run_id: str, verbose: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    cfg = study.cfg
    epochs = int(study.experiment({}).train.resolved()["epochs"])
    searcher = OptunaSearch(points_to_evaluate=study.initial_points() or None, seed=cfg.seed)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent_trials)
    if cfg.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs,
                                  grace_period=min(cfg.scheduler.grace_period, epochs),
                                  reduction_factor=cfg.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    trainable = _trainable(study)
    return tune.Tuner(
        trainable,
        param_space=tune_space(study),
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=cfg.num_samples,
                                    # a reused trial actor has torch and the data loaded already
                                    reuse_actors=trains_in_trial(study)),
        run_config=tune.RunConfig(
            name=study.name, storage_path=str(Path(study.base["storage_path"])),
            callbacks=[MlflowStudyLogger(study, uri, parent_run_id),
                       StudyConsole(study, status_every_s=math.inf if verbose else STATUS_EVERY_S)],
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=study.experiment({}).train.keep_checkpoints),
            # each trial's stdout/stderr in its directory under the Ray results directory
            log_to_file=True,
            verbose=1 if verbose else 0,
        ),
    )


def run_study(study: Study, *, address: str | None = None, verbose: bool = False) -> StudyOutcome:
    """Run a study from the start; the tracking store is checked before any trial."""
    from .train import init_ray, prepare_data, config_yaml

    from .train import quiet_libraries

    if not verbose:
        quiet_libraries()
    uri = study.experiment({}).tracking.resolved_uri()
    tracking.check_reachable(uri)
    if _state_path(study).exists() and (study_dir(study) / "tuner.pkl").exists():
        raise FileExistsError(
            f"study {study.name!r} already exists in {study_dir(study)}: continue it with "
            f"`pisa study resume {study.name}` or choose another name (--set name=...)"
        )
    prepare_data(study.experiment({}))
    init_ray(address, verbose=verbose, dashboard=not trains_in_trial(study))
    experiment = study.base["tracking"]["experiment"]
    parent = tracking.start_run(
        uri, experiment, f"study {study.name}",
        params={"study." + k: v for k, v in flatten(study.cfg.model_dump(mode="json", exclude={"experiment", "search_space"})).items()},
        tags={"pisa.kind": "study", "pisa.study": study.name},
    )
    tracking.log_text(uri, parent, study.source.read_text(), "study.yaml")
    tracking.log_text(uri, parent, json.dumps(study.cfg.model_dump(mode="json")["search_space"], indent=2), "search_space.json")
    tracking.log_text(uri, parent, config_yaml(study.experiment({})), "base_config.yaml")
    _save_state(study, parent, uri)
    _print_start(study, uri)
    tuner = _tuner(study, uri, parent, verbose)
    return _fit_and_finish(study, tuner, uri, parent)


def resume_study(name: str, *, storage_path: str | Path = "ray_results", address: str | None = None,
                 overrides: list[str] | None = None, verbose: bool = False) -> StudyOutcome:
    """Continue an interrupted study: finished trials stay, unfinished ones restart from
    their last checkpoint, errored ones stay failed."""
    from ray import tune

    from .train import init_ray

    state = load_state(name, storage_path)
    study = load_study(state["study_file"], overrides)
    uri = state["tracking_uri"]
    tracking.check_reachable(uri)
    init_ray(address, verbose=verbose)
    tracking.client(uri).update_run(state["parent_run_id"], status="RUNNING")
    trainable = _trainable(study)
    tuner = tune.Tuner.restore(state["dir"], trainable=trainable, resume_unfinished=True,
                               resume_errored=False, restart_errored=False)
    print(f"[pisa] resuming study {study.name} from {state['dir']}", flush=True)
    return _fit_and_finish(study, tuner, uri, state["parent_run_id"])


def _print_start(study: Study, uri: str) -> None:
    cfg = study.cfg
    print(f"[pisa] study {study.name}: {cfg.num_samples} trials, {cfg.max_concurrent_trials} at a time, "
          f"{cfg.scheduler.type} scheduler, metric {cfg.metric} ({cfg.mode}); "
          f"searching {', '.join(cfg.search_space)}", flush=True)
    print(f"[pisa] MLflow: {uri}", flush=True)


def _fit_and_finish(study: Study, tuner, uri: str, parent: str) -> StudyOutcome:
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    outcome = collect(study.name, uri, study.base["tracking"]["experiment"], parent,
                      study.cfg.metric, study.cfg.mode)
    expected = study.cfg.num_samples
    done = [t for t in outcome.trials if t.status in ("finished", "stopped_early", "failed")]
    interrupted = interrupted or len(done) < expected
    outcome.interrupted = interrupted
    from .report import log_study_report

    try:
        log_study_report(outcome, study)
    except Exception as exc:  # a plot must never cost the study's results
        print(f"[pisa] report skipped: {exc}", flush=True)
    if interrupted:
        tracking.set_tags(uri, parent, {"pisa.status": "interrupted"})
        tracking.end_run(uri, parent, "KILLED")
    else:
        tracking.set_tags(uri, parent, {"pisa.status": "finished"})
        tracking.end_run(uri, parent, "FINISHED")
    return outcome


def collect(name: str, uri: str, experiment: str, parent: str, metric: str, mode: str) -> StudyOutcome:
    """The study's trials from MLflow, best first."""
    runs = tracking.find_runs(uri, experiment, f"tags.`mlflow.parentRunId` = '{parent}'")
    trials = []
    for run in runs:
        tags = run.data.tags
        searched = [k for k in tags.get("pisa.searched", "").split(",") if k]
        best = tags.get(f"pisa.best_{metric}")
        value = float(best) if best is not None else run.data.metrics.get(metric)
        status = tags.get("pisa.status", "running")
        trials.append(TrialSummary(
            run_id=run.info.run_id, trial_id=tags.get(TRIAL_TAG, ""), name=run.info.run_name or "",
            status=status, metric=value, epochs=int(float(tags.get("pisa.epochs", run.data.metrics.get("epoch", 0) or 0))),
            params={k: run.data.params.get(k) for k in searched}, error=tags.get("pisa.error"),
        ))
    sign = -1 if mode == "max" else 1
    trials.sort(key=lambda t: (t.status == "failed", t.metric is None,
                               sign * (t.metric if t.metric is not None else 0.0)))
    return StudyOutcome(name, parent, uri, trials, metric)


def outcome_from_state(name: str, storage_path: str | Path = "ray_results") -> StudyOutcome:
    state = load_state(name, storage_path)
    return collect(state["name"], state["tracking_uri"], state["experiment"], state["parent_run_id"],
                   state["metric"], state["mode"])
