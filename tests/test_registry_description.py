"""A registered model version says where it came from: study, trial, metric and value."""

from __future__ import annotations

from types import SimpleNamespace

from pisa.tracking.registry import version_description


def _run(tags: dict, metrics: dict | None = None, name: str = "trial 3") -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id="abc123", run_name=name), data=SimpleNamespace(tags=tags, metrics=metrics or {})
    )


def test_a_study_trial_names_its_study_trial_and_best_value():
    run = _run({"pisa.study": "quick", "pisa.trial_id": "7ec14d32", "pisa.best_bbox_mAP": "0.4123"})
    assert version_description(run) == "run abc123 (trial 3); study quick; trial 7ec14d32; best bbox_mAP 0.4123"
    # the tag keeps every digit of the value; the description, four
    run.data.tags["pisa.best_bbox_mAP"] = "0.0014346155927068116"
    assert version_description(run).endswith("; best bbox_mAP 0.001435")


def test_a_training_without_a_study_names_its_run_and_metric():
    run = _run({"pisa.best_run_id": "x"}, {"bbox_mAP": 0.25, "loss": 1.0}, name="")
    assert version_description(run) == "run abc123; best bbox_mAP 0.25"
