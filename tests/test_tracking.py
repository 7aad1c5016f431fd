"""Tracking helpers against a real SQLite MLflow store."""

from __future__ import annotations

from pisa import tracking


def test_long_tag_values_are_cut_at_mlflows_limit_not_rejected(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "tests", "long-tag")
    tracking.set_tags(uri, run_id, {"pisa.error": "x" * 9000, "short": "ok"})
    tags = tracking.client(uri).get_run(run_id).data.tags
    assert tags["pisa.error"] == "x" * 8000 and tags["short"] == "ok"
