"""`pisa.training_grid` on the path a multi-worker study takes: each training a `TorchTrainer`
driven from its Tune trial (the in-process path is what `pisa study validate` runs in
tests/test_seeds.py). Real Ray Tune + Train and MLflow (SQLite); tiny synthetic data."""

from __future__ import annotations

import pytest
from helpers import tiny_experiment

from pisa import tracking
from pisa.config import ExperimentConfig
from pisa.study import trial_driver_resources
from pisa.training_grid import GridTraining, train_grid

pytestmark = pytest.mark.slow


def test_torch_trainer_trainings_are_tracked_with_their_final_checkpoint(ray_local, synthetic_dir, tmp_path):
    raw = tiny_experiment(synthetic_dir, tmp_path, epochs=1, workers=1)
    base = ExperimentConfig.model_validate(raw)
    uri = base.tracking.resolved_uri()
    parent = tracking.start_run(uri, "tests", "grid parent")
    trainings = [
        GridTraining(
            base.model_copy(update={"train": base.train.model_copy(update={"seed": seed})}),
            f"seed {seed}",
            {"pisa.seed": str(seed)},
        )
        for seed in (3, 4)
    ]
    outcomes = train_grid(
        trainings,
        uri=uri,
        parent_run_id=parent,
        storage_path=str(tmp_path / "grid"),
        name="grid",
        in_trial=False,
        resources=trial_driver_resources(),
        concurrent=1,
        max_failures=0,
        score=("train_loss", "min"),
        num_classes=3,
    )
    assert [o.status for o in outcomes] == ["FINISHED", "FINISHED"], [o.error for o in outcomes]
    client = tracking.client(uri)
    losses = []
    for seed, outcome in zip((3, 4), outcomes):
        run = client.get_run(outcome.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.NESTED_TAG] == parent and run.data.tags["pisa.seed"] == str(seed)
        assert run.data.params["train.seed"] == str(seed) and run.data.params["data.num_classes"] == "3"
        history = client.get_metric_history(outcome.run_id, "train_loss")
        assert [m.step for m in history] == [1]
        assert history[0].value == pytest.approx(outcome.metrics["train_loss"])
        losses.append(history[0].value)
        # the TorchTrainer's last checkpoint, found through its trial: its plot is on the run
        assert "plots/pisa_weights.png" in {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert losses[0] != losses[1]  # two seeds, two trainings
