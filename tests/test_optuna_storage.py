"""The study's Optuna record, driven through the Tune searcher API as Tune drives it:
`on_trial_result` for every epoch but the last, `on_trial_complete` with the last."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from pisa.search.optuna_storage import PruningOptunaSearch, default_storage_url, open_storage


@pytest.fixture
def searcher(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = PruningOptunaSearch(
        space={"k": optuna.distributions.FloatDistribution(0.5, 3.0)},
        metric="bbox_mAP",
        mode="max",
        seed=0,
        study_name="s",
        storage=open_storage(url),
        time_attr="epoch",
        max_t=3,
    )
    return s, url


def test_stopped_trial_is_pruned_with_every_epoch_and_finished_one_complete(searcher):
    s, url = searcher
    assert s.suggest("stopped") is not None and s.suggest("finished") is not None
    s.on_trial_result("stopped", {"epoch": 1, "bbox_mAP": 0.10})
    s.on_trial_complete("stopped", {"epoch": 2, "bbox_mAP": 0.15})  # a scheduler stopped it at 2 of 3
    for epoch, value in [(1, 0.2), (2, 0.3)]:
        s.on_trial_result("finished", {"epoch": epoch, "bbox_mAP": value})
    s.on_trial_complete("finished", {"epoch": 3, "bbox_mAP": 0.4})
    stored = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in stored] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert stored[0].intermediate_values == {1: 0.10, 2: 0.15}
    assert stored[0].value == 0.15  # Optuna gives a pruned trial its last intermediate value
    assert stored[0].user_attrs["stopped_at_epoch"] == 2
    assert stored[1].value == 0.4 and stored[1].intermediate_values == {1: 0.2, 2: 0.3, 3: 0.4}


def test_failed_trial_is_failed_not_pruned(searcher):
    s, url = searcher
    s.suggest("broken")
    s.on_trial_result("broken", {"epoch": 1, "bbox_mAP": 0.1})
    s.on_trial_complete("broken", None, error=True)
    (trial,) = optuna.load_study(study_name="s", storage=url).trials
    assert trial.state == TrialState.FAIL and trial.intermediate_values == {1: 0.1}


def test_default_storage_sits_beside_a_sqlite_mlflow_store_or_in_local_storage(tmp_path):
    assert default_storage_url(f"sqlite:///{tmp_path}/m/mlflow.db", "x") == f"sqlite:///{tmp_path}/m/optuna.db"
    assert default_storage_url("http://127.0.0.1:5000", tmp_path / "r") == f"sqlite:///{tmp_path}/r/optuna.db"
    assert default_storage_url("http://127.0.0.1:5000", "s3://bucket/pisa") is None
