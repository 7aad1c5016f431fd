"""MLflow with a PostgreSQL backend store, for real: a local PostgreSQL server, a real
`mlflow server` on top of it, and a CPU study tracked through it, one of whose trials
diverges."""

from __future__ import annotations

import pytest
from helpers import children, mlflow_client, write_study

from pisa.search.study import load_study
from pisa.search.tuner import run_study

pytestmark = pytest.mark.slow


def test_study_with_a_diverging_trial_is_stored_in_postgres(
    ray_local, synthetic_dir, postgres_server, mlflow_server, tmp_path
):
    server = mlflow_server(*postgres_server.mlflow_backend())
    path = write_study(
        tmp_path,
        synthetic_dir,
        "pg-study",
        uri=server.uri,
        num_samples=2,
        scheduler={"type": "fifo"},
        search_space={"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e6}},
        points_to_evaluate=[{"train.lr": 1e6}, {"train.lr": 0.02}],
    )
    outcome = run_study(load_study(path))
    runs = children(server.uri, "tests", outcome.parent_run_id)
    assert len(runs) == 2
    by_lr = {float(r.data.params["train.lr"]): r for r in runs}
    diverged, run = by_lr[1e6], by_lr[0.02]
    # the diverging trial fails with its reason; the study goes on and ends
    assert diverged.info.status == "FAILED" and diverged.data.tags["pisa.status"] == "failed"
    assert "non-finite loss" in diverged.data.tags["pisa.error"]
    assert run.info.status == "FINISHED"

    c = mlflow_client(server.uri)
    assert c.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert run.data.params["model.isr_p.enabled"] == "True"
    history = c.get_metric_history(run.info.run_id, "bbox_mAP")
    assert [m.step for m in history] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in history)

    # artifacts went through the server's proxy into --artifacts-destination
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(list(server.artifacts.rglob("config.yaml"))) == 2, "a trial's config.yaml is not in the artifact store"

    # and the rows really are in PostgreSQL
    db = "mlflow"
    ids = [r.info.run_id for r in runs]
    rows = postgres_server.query("SELECT status, name FROM runs WHERE run_uuid = %s", (run.info.run_id,), db)
    assert rows == [("FINISHED", run.info.run_name)]
    ((n_params,),) = postgres_server.query("SELECT count(*) FROM params WHERE run_uuid = %s", (run.info.run_id,), db)
    assert n_params == len(run.data.params)
    rows = postgres_server.query(
        "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = %s AND run_uuid = ANY(%s)",
        (outcome.parent_run_id, ids),
        db,
    )
    assert rows == [(2,)]
    ((n,),) = postgres_server.query(
        "SELECT count(*) FROM metrics WHERE key = 'bbox_mAP' AND run_uuid = ANY(%s)", (ids,), db
    )
    assert n == 2  # the healthy trial's 2 epochs; the diverging one reached no evaluation
