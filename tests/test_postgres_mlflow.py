"""MLflow with a PostgreSQL backend store, for real: a local PostgreSQL server, a real
`mlflow server` on top of it, and a CPU training tracked through it."""

from __future__ import annotations

import pytest
from helpers import tiny_experiment

from pisa import tracking
from pisa.config import parse_config
from pisa.train import run_training

pytestmark = pytest.mark.slow


def test_training_run_is_stored_in_postgres(ray_local, synthetic_dir, postgres_server, mlflow_server, tmp_path):
    pg_server = mlflow_server(*postgres_server.mlflow_backend())
    data = tiny_experiment(synthetic_dir, tmp_path, epochs=1)
    data["tracking"] = {"uri": pg_server.uri, "experiment": "postgres"}
    outcome = run_training(parse_config(data), run_name="pg")
    assert outcome.status == "FINISHED", outcome.error

    c = tracking.client(pg_server.uri)
    run = c.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.isr_p.enabled"] == "True"
    assert run.data.params["train.epochs"] == "1"
    history = c.get_metric_history(outcome.run_id, "bbox_mAP")
    assert [m.step for m in history] == [1]
    assert 0.0 <= history[0].value <= 1.0

    # artifacts went through the server's proxy into --artifacts-destination
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(pg_server.artifacts.rglob("config.yaml")), "config.yaml not in the artifact store"

    # and the rows really are in PostgreSQL
    db = "mlflow"
    rows = postgres_server.query("SELECT status, name FROM runs WHERE run_uuid = %s", (outcome.run_id,), db)
    assert rows == [("FINISHED", "pg")]
    ((n_params,),) = postgres_server.query("SELECT count(*) FROM params WHERE run_uuid = %s", (outcome.run_id,), db)
    assert n_params == len(run.data.params)
    steps = postgres_server.query(
        "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'bbox_mAP' ORDER BY step", (outcome.run_id,), db
    )
    assert steps == [(1,)]


def test_two_trial_study_is_stored_in_postgres(ray_local, synthetic_dir, postgres_server, mlflow_server, tmp_path):
    pg_server = mlflow_server(*postgres_server.mlflow_backend())
    from helpers import children, write_study

    from pisa.study import run_study
    from pisa.study_config import load_study

    path = write_study(
        tmp_path, synthetic_dir, "pg-study", uri=pg_server.uri, num_samples=2, scheduler={"type": "fifo"}
    )
    outcome = run_study(load_study(path))
    runs = children(pg_server.uri, "tests", outcome.parent_run_id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    ids = [r.info.run_id for r in runs]
    rows = postgres_server.query(
        "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = %s AND run_uuid = ANY(%s)",
        (outcome.parent_run_id, ids),
        "mlflow",
    )
    assert rows == [(2,)]
    ((n,),) = postgres_server.query(
        "SELECT count(*) FROM metrics WHERE key = 'bbox_mAP' AND run_uuid = ANY(%s)", (ids,), "mlflow"
    )
    assert n == 4  # 2 trials x 2 epochs
