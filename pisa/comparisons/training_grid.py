"""A list of independent trainings (a variant x seed grid) run as one Ray Tune run.

`pisa study validate` trains every variant on every seed. Each training is a Tune trial of
the study's trainable path (`pisa.trials.fit.fit_in_trial`): a 1-worker study's trainings train
in the trial's own process and Tune reuses the trial actors, so a training starts in
seconds instead of paying a Ray Train controller, worker group and process group each; a
multi-worker study's trainings run as `TorchTrainer`s as its trials did. Tune also brings
what the trials have: as many side by side as the cluster fits, restarts from the last
checkpoint after a lost worker (`max_failures`), and each trial's log in its directory.

Each training gets its own MLflow run, nested under `parent_run_id`, written from the
driver only (a Tune callback): params and config, per-epoch metrics, system metrics, then
the final checkpoint's plots (and the checkpoint, if the config logs it) and its status.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import tracking
from ..core import storage
from ..core.config import ExperimentConfig
from ..core.errors import one_line
from ..core.progress import say
from ..core.storage import location_of
from ..core.uris import public_uri
from ..tracking.run_writer import TrainingRun
from ..tracking.tags import GRID_JOB, RunStatus, Status
from ..training.faults import driver_fault
from ..trials import recovery as trial_recovery
from ..trials.fit import failing_at_once_on_retry, fit_in_trial, trial_error
from ..trials.recovery import FAILED_MARK
from ..trials.run_callback import ENDED, TrainingRunsCallback
from ..trials.seeds import CHECKPOINT_PATH_KEY

if TYPE_CHECKING:
    from ..training.train import TrainOutcome

JOB_TAG = GRID_JOB  # a training's index in the grid, on its MLflow run
INTERRUPTED = "interrupted"  # a training's error when the grid was stopped before it ended


@dataclass
class GridTraining:
    """One training of the grid: its config (seed included), MLflow run name and tags."""

    experiment: ExperimentConfig
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    faults: dict[str, Any] | None = None  # test-only fault injection (see `pisa.training.faults`)
    # where the grid's trainings differ (`pisa compare`): this one's own, else the grid's
    in_trial: bool | None = None
    resources: dict[str, float] | None = None
    num_classes: int | None = None


def slug(label: str) -> str:
    """`label` as a file and metric name: runs of other characters become one `_`."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", label).strip("_")


def _train_one(
    config: dict[str, Any],
    experiments: list[dict[str, Any]],
    faults: list[dict[str, Any] | None],
    in_trial: list[bool],
    score: tuple[str, str],
):
    """Tune function trainable: the grid's training number `config["job"]`."""
    from ray import tune

    job = config["job"]
    exp = ExperimentConfig.model_validate(experiments[job])
    trial_id = tune.get_context().get_trial_id()
    final = trial_recovery.read_done_mark(storage.join(exp.storage_path, trial_id, trial_recovery.DONE_MARK))
    if final is not None:  # it ended before a driver was lost: report its end, train nothing
        tune.report(final)
        return
    with failing_at_once_on_retry(storage.join(exp.storage_path, trial_id, FAILED_MARK)):
        fit_in_trial(exp, name=trial_id, in_trial=in_trial[job], checkpoint_score=score, faults=faults[job])


class GridLogger(TrainingRunsCallback):
    """Tune callback on the driver: one MLflow run per training, nested under the parent."""

    def __init__(self, uri: str, parent_run_id: str, trainings: list[GridTraining], num_classes: int, metric: str):
        super().__init__(uri, parent_run_id)
        self.trainings = trainings
        self.num_classes = num_classes
        self.metric = metric
        self.last: dict[int, dict[str, Any]] = {}
        self.reconciled = True  # until `setup` (a fresh or a resumed grid)

    def key(self, trial) -> int:
        return int(trial.config["job"])

    def _experiment(self) -> str:
        return self.trainings[0].experiment.tracking.experiment

    def _key_of_run(self, run) -> int | None:
        """A resumed grid (`pisa compare` run again) keeps its trainings' runs."""
        job = run.data.tags.get(JOB_TAG)
        return int(job) if job is not None and job.isdigit() else None

    def _create_run(self, trial) -> TrainingRun:
        job = self.key(trial)
        t = self.trainings[job]
        run = TrainingRun.start(
            self.uri,
            t.experiment,
            t.run_name,
            tags={**t.tags, JOB_TAG: str(job)},
            params={"data.num_classes": t.num_classes if t.num_classes is not None else self.num_classes},
            parent_run_id=self.parent_run_id,
        )
        run.log_config(t.experiment)
        return run

    def _system_metrics_interval(self, trial) -> float | None:
        return self.trainings[self.key(trial)].experiment.tracking.system_metrics_interval_s

    def on_trial_start(self, iteration, trials, trial, **info):
        self._trial_started(trial, resumed=self.key(trial) in self.runs, status_tag=False)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._log_result(trial, result, int(result.get("epoch", 0)))
        self.last[self.key(trial)] = dict(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        exp = self.trainings[self.key(trial)].experiment
        last = self.last.get(self.key(trial))
        if last is not None:  # survives the driver: a resumed grid does not train it again
            mark = storage.join(exp.storage_path, trial.trial_id, trial_recovery.DONE_MARK)
            trial_recovery.write_done_mark(mark, _json_result(last))
        self._finished(trial, trials, None)
        driver_fault("trial_complete")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, trials, trial_error(trial))

    def _finished(self, trial, trials, error: str | None) -> None:
        job = self.key(trial)
        self._stop_system_metrics(trial)
        # over all the grid's trials: a resumed grid counts what finished before
        done = 1 + sum(t is not trial and t.status in ENDED for t in trials)
        t = self.trainings[job]
        if error is not None:
            shown = f"failed: {error}"
        else:
            value = self.last.get(job, {}).get(self.metric)
            shown = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "done"
        say(f"training {done}/{len(self.trainings)}: {t.run_name}: {shown}")


def _json_result(result: dict[str, Any]) -> dict[str, Any]:
    """A Tune result's numbers and strings: what a done mark keeps and reports again."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}


def train_grid(
    trainings: list[GridTraining],
    *,
    uri: str,
    parent_run_id: str,
    storage_path: str,
    name: str,
    in_trial: bool,
    resources: dict[str, float],
    concurrent: int,
    max_failures: int,
    score: tuple[str, str],
    num_classes: int,
    resume: bool = False,
) -> list[TrainOutcome]:
    """Train every config of `trainings` (in order, `concurrent` at a time) as the trials of
    one Tune run under `storage_path/name`; their outcomes, in the same order. `resume`
    continues that run: finished trainings stay, the others go on from their last
    checkpoint. (Over 60 lines: most are the Tuner's settings, each spelled out once.)"""
    from ray import tune

    from ..training.train import TrainOutcome  # torch (the train loop's module)

    if not trainings:
        return []
    experiments = [t.experiment.model_dump(mode="json") for t in trainings]
    dir_names = [slug(t.run_name) for t in trainings]
    own_process = [in_trial if t.in_trial is None else t.in_trial for t in trainings]
    held = [resources if t.resources is None else t.resources for t in trainings]
    trainable = tune.with_resources(
        tune.with_parameters(
            _train_one, experiments=experiments, faults=[t.faults for t in trainings], in_trial=own_process, score=score
        ),
        lambda config: held[config["job"]],
    )
    if resume:
        tuner = tune.Tuner.restore(
            storage.join(storage_path, name),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search(list(range(len(trainings))))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrent,
                reuse_actors=all(own_process),  # a reused actor has torch imported and the data cached
                trial_dirname_creator=lambda trial: f"{trial.trial_id}-{dir_names[trial.config['job']]}",
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                callbacks=[GridLogger(public_uri(uri), parent_run_id, trainings, num_classes, score[0])],
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=trainings[0].experiment.train.keep_checkpoints,
                    checkpoint_score_attribute=score[0],
                    checkpoint_score_order=score[1],
                ),
                log_to_file=True,
                verbose=0,
            ),
        )
    results = tuner.fit()
    # the runs by their job tag: through Ray Client the logger ran on the cluster, not here
    run_ids = {
        int(run.data.tags[JOB_TAG]): run.info.run_id
        for run in tracking.tracker(uri).children(trainings[0].experiment.tracking.experiment, parent_run_id)
        if JOB_TAG in run.data.tags
    }
    outcomes = [TrainOutcome(None, str(RunStatus.FAILED), error="not run") for _ in trainings]
    for i in range(len(results)):
        job = int((results[i].config or {})["job"])
        outcomes[job] = _finish(results[i], trainings[job].experiment, uri, run_ids.get(job))
    return outcomes


def _finish(result, exp: ExperimentConfig, uri: str, run_id: str | None) -> TrainOutcome:
    """A training's outcome from its Tune result; its MLflow run ended with it (and for a
    finished one, its final checkpoint's plots and, if the config says so, the checkpoint)."""
    from ..training.train import TrainOutcome, log_final_artifacts  # torch (the train loop's module)

    metrics = dict(result.metrics or {})
    if result.error is None and int(metrics.get("epoch", 0) or 0) < exp.train.resolved().epochs:
        # neither finished nor failed: the grid was stopped (Ctrl-C, SIGTERM) before it ended
        if run_id is not None:
            TrainingRun(uri, run_id).end(RunStatus.KILLED, status=Status.INTERRUPTED)
        return TrainOutcome(run_id, str(RunStatus.KILLED), metrics, error=INTERRUPTED)
    if result.error is not None or run_id is None:
        message = one_line(result.error, "never started")
        if run_id is not None:
            TrainingRun(uri, run_id).end(RunStatus.FAILED, error=message)
        return TrainOutcome(run_id, str(RunStatus.FAILED), metrics, error=message)
    # in its own process a training reports checkpoints to Tune; a TorchTrainer, their path
    path = result.checkpoint.path if result.checkpoint else metrics.get(CHECKPOINT_PATH_KEY)
    checkpoint = location_of(path, exp.storage_path) if path else None
    run = TrainingRun(uri, run_id)
    log_final_artifacts(run, checkpoint, exp.tracking.log_checkpoint)
    run.end(RunStatus.FINISHED)
    return TrainOutcome(run_id, str(RunStatus.FINISHED), metrics, checkpoint)
