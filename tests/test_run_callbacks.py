"""The Tune callbacks that write the trials' MLflow runs, driven by hand (no Ray, no training):
the study's `MlflowStudyLogger` and the training grid's `GridLogger`."""

from __future__ import annotations

from types import SimpleNamespace

from helpers import mlflow_client, tiny_experiment, write_study

from pisa import tracking
from pisa.comparisons.training_grid import GridLogger, GridTraining, _finish
from pisa.core import storage
from pisa.core.config import ExperimentConfig
from pisa.search.mlflow_logger import MlflowStudyLogger
from pisa.search.paths import done_mark
from pisa.search.study import load_study


def _trial(trial_id: str, status: str = "RUNNING", **config):
    return SimpleNamespace(trial_id=trial_id, config=config, status=status, pickled_error_file=None, error_file=None)


def _result(epoch: int, value: float) -> dict:
    return {"epoch": epoch, "bbox_mAP": value, "train_loss": 1.0 / epoch, "training_iteration": epoch, "time_s": 9.0}


def test_the_study_logger_writes_each_trials_run_and_resumes_without_logging_an_epoch_twice(synthetic_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = load_study(write_study(tmp_path, synthetic_dir, "hand", uri=uri))
    experiment = study.base_config.tracking.experiment
    tracker = tracking.tracker(uri)
    parent = tracker.start_run(experiment, "study hand")
    point = {"model.isr_p.k": 1.5, "model.isr_p.bias": 0.25}
    done, failed, cut = _trial("done", **point), _trial("failed", **point), _trial("cut", **point)

    logger = MlflowStudyLogger(study, uri, parent)
    logger.setup()
    for trial in (done, failed, cut):
        logger.on_trial_start(0, [], trial)
        logger.on_trial_result(0, [], trial, _result(1, 0.1))
    logger.on_trial_result(0, [], done, _result(1, 0.9))  # reported again: not logged twice
    logger.on_trial_result(0, [], done, _result(2, 0.3))
    logger.on_trial_complete(0, [], done)
    logger.on_trial_error(0, [], failed)
    ghost = tracker.start_run(experiment, "ghost", tags={"pisa.trial_id": "ghost"}, parent_run_id=parent)
    done.status, failed.status = "TERMINATED", "ERROR"
    logger.on_experiment_end([done, failed, cut])

    c = mlflow_client(uri)
    runs = {r.data.tags["pisa.trial_id"]: r for r in tracker.children(experiment, parent)}
    assert set(runs) == {"done", "failed", "cut"}  # the ghost, unknown to the search, is removed
    assert c.get_run(ghost).info.lifecycle_stage == "deleted"
    tags = runs["done"].data.tags
    assert runs["done"].info.status == "FINISHED" and tags["pisa.status"] == "finished"
    assert tags["pisa.kind"] == "trial" and tags["pisa.study"] == "hand" and tags["pisa.epochs"] == "2"
    assert tags["pisa.searched"] == "model.isr_p.k,model.isr_p.bias" and tags["pisa.best_bbox_mAP"] == "0.3"
    assert [(m.step, m.value) for m in c.get_metric_history(runs["done"].info.run_id, "bbox_mAP")] == [
        (1, 0.1),
        (2, 0.3),
    ]
    assert "time_s" not in runs["done"].data.metrics  # Tune's own counters stay out
    assert storage.exists(done_mark(study, "done"))
    assert runs["failed"].info.status == "FAILED"
    assert runs["failed"].data.tags["pisa.status"] == "failed" and runs["failed"].data.tags["pisa.error"]
    assert runs["cut"].info.status == "KILLED" and runs["cut"].data.tags["pisa.status"] == "interrupted"

    # the study resumed by a new driver: the interrupted and the failed (retried) trials run again
    resumed = MlflowStudyLogger(study, uri, parent)
    resumed.setup()
    assert resumed.runs["cut"].logged_epoch == 1
    for trial in (cut, failed):
        trial.status = "RUNNING"
        resumed.on_trial_start(0, [], trial)
        resumed.on_trial_result(0, [], trial, _result(1, 0.7))  # trained again from an older checkpoint
        resumed.on_trial_result(0, [], trial, _result(2, 0.2))
    run = c.get_run(resumed.runs["failed"].run_id)
    assert run.info.status == "RUNNING" and run.data.tags["pisa.status"] == "running"
    assert "pisa.error" not in run.data.tags
    history = c.get_metric_history(resumed.runs["cut"].run_id, "bbox_mAP")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2)]
    resumed.on_experiment_end([done, failed, cut])


def test_the_grid_logger_writes_each_trainings_run_and_the_grid_ends_it(synthetic_dir, tmp_path):
    cfg = ExperimentConfig.model_validate(tiny_experiment(synthetic_dir, tmp_path, epochs=1))
    uri = cfg.tracking.resolved_uri()
    parent = tracking.tracker(uri).start_run(cfg.tracking.experiment, "grid parent")
    trainings = [GridTraining(cfg, "seed 3", {"pisa.kind": "validation_training", "pisa.seed": "3"})]
    logger = GridLogger(uri, parent, trainings, num_classes=3, metric="bbox_mAP")
    trial = _trial("g1", job=0)
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, _result(1, 0.4))
    logger.on_trial_complete(0, [], trial)
    run_id = logger.runs[0].run_id

    outcome = _finish(SimpleNamespace(error=None, metrics=_result(1, 0.4), checkpoint=None), cfg, uri, run_id)
    assert outcome.status == "FINISHED" and outcome.run_id == run_id
    run = mlflow_client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pisa.grid_job"] == "0"
    assert run.data.tags["pisa.kind"] == "validation_training" and run.data.tags["pisa.seed"] == "3"
    assert "pisa.status" not in run.data.tags
    assert run.data.params["data.num_classes"] == "3" and run.data.metrics["bbox_mAP"] == 0.4

    # a training the grid's stop (Ctrl-C, SIGTERM) cut short: neither finished nor failed
    two_epochs = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})})
    cut = _finish(SimpleNamespace(error=None, metrics=_result(1, 0.4), checkpoint=None), two_epochs, uri, run_id)
    assert cut.status == "KILLED" and cut.error == "interrupted"
    run = mlflow_client(uri).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["pisa.status"] == "interrupted"

    failed = _finish(SimpleNamespace(error=RuntimeError("boom"), metrics={}, checkpoint=None), cfg, uri, run_id)
    assert failed.status == "FAILED" and failed.error == "boom"
    run = mlflow_client(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["pisa.error"] == failed.error
