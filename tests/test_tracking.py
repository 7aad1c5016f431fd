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


def test_processes_that_create_a_new_sqlite_store_at_once_all_succeed(tmp_path, monkeypatch):
    # two `pisa train`s started together on a new store: MLflow's table creation and
    # migrations, run by both at once, used to fail one ("duplicate column name: step"); with
    # an empty cache, the first of them has MLflow make the empty store the others copy
    monkeypatch.setenv("PISA_CACHE_DIR", str(tmp_path / "cache"))
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


def _schema_and_rows(db) -> tuple[list, list, list]:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        schema = sorted(con.execute("SELECT type, name, sql FROM sqlite_master").fetchall(), key=str)
        version = con.execute("SELECT version_num FROM alembic_version").fetchall()
        experiments = con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments")
        return schema, version, experiments.fetchall()


def test_a_new_store_copied_from_the_cache_is_the_store_mlflow_makes(tmp_path, monkeypatch):
    monkeypatch.setenv("PISA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the Default experiment's artifacts: <cwd>/mlruns/0
    for name in ("made", "copied", "copied-again"):
        (tmp_path / name).mkdir()
    mlflow_client(f"sqlite:///{tmp_path / 'made' / 'mlflow.db'}").search_experiments()  # MLflow alone
    for name in ("copied", "copied-again"):
        tracking.tracker(f"sqlite:///{tmp_path / name / 'mlflow.db'}").start_run("tests", "a run")
    made = _schema_and_rows(tmp_path / "made" / "mlflow.db")
    for name in ("copied", "copied-again"):
        schema, version, experiments = _schema_and_rows(tmp_path / name / "mlflow.db")
        assert (schema, version) == made[:2]
        assert experiments[0] == made[2][0] == (0, "Default", str(tmp_path / "mlruns" / "0"), "active")
        assert [e[1] for e in experiments[1:]] == ["tests"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"mlflow-{_mlflow_version()}-empty.db"]


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def test_a_relative_sqlite_uri_keeps_its_artifacts_beside_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stores").mkdir()
    tracking.tracker("sqlite:///stores/rel.db").start_run("tests", "a run")  # relative to the cwd
    location = mlflow_client(f"sqlite:///{tmp_path / 'stores' / 'rel.db'}").get_experiment_by_name("tests")
    assert location.artifact_location == (tmp_path / "stores" / "mlartifacts").as_uri()
