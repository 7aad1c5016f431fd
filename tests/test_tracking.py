"""Tracking helpers against a real SQLite MLflow store."""

from __future__ import annotations

import multiprocessing as mp

from helpers import mlflow_client

from pisa import tracking


def test_long_tag_values_are_cut_at_mlflows_limit_not_rejected(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.tracker(uri).start_run("tests", "long-tag")
    tracking.tracker(uri).set_tags(run_id, {"pisa.error": "x" * 9000, "short": "ok"})
    tags = mlflow_client(uri).get_run(run_id).data.tags
    assert tags["pisa.error"] == "x" * 8000 and tags["short"] == "ok"


def test_a_store_is_written_through_one_client_per_process(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tracking.tracker(uri)
    assert tracking.tracker(uri) is store and mlflow_client(uri) is store._client
    assert tracking.tracker(f"sqlite:///{tmp_path / 'other.db'}")._client is not store._client


def test_runs_nest_and_params_lose_credentials_and_length(tmp_path):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    store = tracking.tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = store.start_run("tests", "parent")
    child = store.start_run(
        "tests",
        "child",
        params={"tracking.uri": "http://alice:secret@mlflow.example:5000", "long": "y" * 9000},
        parent_run_id=parent,
    )
    store.start_run("tests", "unrelated")
    assert [r.info.run_id for r in store.children("tests", parent)] == [child]
    params = store._client.get_run(child).data.params
    assert params["tracking.uri"] == "http://mlflow.example:5000"
    assert params["long"] == "y" * MAX_PARAM_VAL_LENGTH
    assert store.find_runs("no such experiment") == []


def _first_run_on(uri: str, barrier, results) -> None:
    import mlflow  # noqa: F401 (imported before the barrier: the processes race on the store, not on imports)

    barrier.wait(timeout=120)
    try:
        results.put(tracking.tracker(uri).start_run("tests", "racer"))
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_that_create_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    # two `pisa train`s started together on a new store: MLflow's table creation and
    # migrations, run by both at once, used to fail one ("duplicate column name: step")
    ctx = mp.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [ctx.Process(target=_first_run_on, args=(uri, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(len(o) == 32 for o in outcomes), outcomes  # three run ids, no error
    runs = mlflow_client(uri).search_runs([mlflow_client(uri).get_experiment_by_name("tests").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(outcomes)
