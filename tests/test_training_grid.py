"""`pisa.comparisons.training_grid` on the path a multi-worker study takes: each training a `TorchTrainer`
driven from its Tune trial (the in-process path is what `pisa study validate` runs in
tests/test_seeds.py). Real Ray Tune + Train and MLflow (SQLite); tiny synthetic data."""

from __future__ import annotations

import pytest
from helpers import mlflow_client, tiny_experiment

from pisa import tracking
from pisa.comparisons.training_grid import GridTraining, train_grid
from pisa.core.config import ExperimentConfig
from pisa.tracking.store import NESTED_TAG
from pisa.trials.capacity import trial_driver_resources

pytestmark = pytest.mark.slow


def test_torch_trainer_trainings_are_tracked_and_a_diverging_one_fails_once(ray_local, synthetic_dir, tmp_path):
    raw = tiny_experiment(synthetic_dir, tmp_path, epochs=1, workers=1)
    base = ExperimentConfig.model_validate(raw)
    uri = base.tracking.resolved_uri()
    parent = tracking.tracker(uri).start_run("tests", "grid parent")
    healthy = base.model_copy(update={"train": base.train.model_copy(update={"seed": 3})})
    nan_log = tmp_path / "nan.log"
    diverging = GridTraining(base, "nan", {}, faults={"nan_at": 1, "nan_log": str(nan_log)})  # NaN at step 2
    outcomes = train_grid(
        [GridTraining(healthy, "seed 3", {"pisa.seed": "3"}), diverging],
        uri=uri,
        parent_run_id=parent,
        storage_path=str(tmp_path / "grid"),
        name="grid",
        in_trial=False,
        resources=trial_driver_resources(),
        concurrent=2,  # side by side: each start-up overlaps the other's
        max_failures=2,
        score=("train_loss", "min"),
        num_classes=3,
    )
    ok, failed = outcomes
    assert ok.status == "FINISHED", ok.error
    client = mlflow_client(uri)
    run = client.get_run(ok.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[NESTED_TAG] == parent and run.data.tags["pisa.seed"] == "3"
    assert run.data.params["train.seed"] == "3" and run.data.params["data.num_classes"] == "3"
    history = client.get_metric_history(ok.run_id, "train_loss")
    assert [m.step for m in history] == [1]
    assert history[0].value == pytest.approx(ok.metrics["train_loss"])
    # the TorchTrainer's last checkpoint, found through its trial: its plot is on the run
    assert "plots/pisa_weights.png" in {a.path for a in client.list_artifacts(ok.run_id, "plots")}

    # a non-finite loss ends the TorchTrainer without a restart, and the trial's retries
    # (max_failures=2) fail at once with the same error
    assert failed.status == "FAILED" and failed.error.startswith("NonFiniteLossError: non-finite loss"), failed.error
    run = client.get_run(failed.run_id)
    assert run.info.status == "FAILED" and run.data.tags["pisa.error"] == failed.error
    assert nan_log.read_text() == "rank 0\n"  # trained once: neither Ray Train nor Tune retried it
