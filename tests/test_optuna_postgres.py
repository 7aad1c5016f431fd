"""The study's Optuna record on PostgreSQL (the README's recommendation) after its driver is
killed and the study resumed: every trial Tune ran is in Optuna once, COMPLETE or PRUNED as
Tune ended it, with each epoch's value once as an intermediate value, and no trial is left
RUNNING or FAIL. The driver is SIGKILLed right after a trial's end was handled (the crash
hook `trial_complete`), before Tune saved its state: the resume reports that trial's end
again and must leave the Optuna trial as it was told."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import children, mlflow_client, write_study
from optuna.trial import TrialState

from pisa.search.state import load_state

PISA = [sys.executable, "-m", "pisa.cli"]
NAME = "optuna-pg"
TRIALS = 4
EPOCHS = 2

pytestmark = pytest.mark.slow


def _leg(tmp_path: Path, args: list[str], index: int, env: dict[str, str]) -> tuple[int, str]:
    """One `pisa` process in its own process group (with the local Ray it starts), to its end;
    what is left of the group is killed after it (a killed driver's Ray and trials)."""
    log = tmp_path / f"leg{index}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            PISA + args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        code = proc.wait(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    return code, log.read_text()


def test_optuna_record_on_postgres_after_a_driver_kill_and_resume(
    synthetic_dir, tmp_path, postgres_server, monkeypatch
):
    database = postgres_server.create_database("optuna_crash")
    # the password from libpq's environment (PGPASSWORD), never in the study file
    url = f"postgresql+psycopg://{postgres_server.user}@{postgres_server.host}:{postgres_server.port}/{database}"
    path = write_study(
        tmp_path,
        synthetic_dir,
        NAME,
        num_samples=TRIALS,
        optuna_storage=url,
        # ASHA at epoch 1 of 2: some trials end PRUNED, the others COMPLETE
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PGPASSWORD": postgres_server.password}
    env.pop("MLFLOW_TRACKING_URI", None)
    code, out = _leg(
        tmp_path, ["study", "run", str(path)], 1, {**env, "PISA_DRIVER_FAULTS": '{"kill_at": "trial_complete:1"}'}
    )
    assert code == -signal.SIGKILL and "killing the driver at trial_complete" in out, out[-4000:]
    code, out = _leg(tmp_path, ["study", "resume", NAME, "--storage-path", str(tmp_path / "ray_results")], 2, env)
    assert code == 0, out[-4000:]
    assert "resuming study" in out

    state = load_state(NAME, tmp_path / "ray_results")
    uri = state.tracking_uri
    runs = children(uri, "tests", state.parent_run_id)
    assert len(runs) == TRIALS, [r.data.tags.get("pisa.trial_id") for r in runs]
    client = mlflow_client(uri)
    ended = {}  # by the point's params: (Optuna's state as Tune ended it, the per-epoch values)
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        status = run.data.tags["pisa.status"]
        assert status in ("finished", "stopped_early"), status
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "bbox_mAP")}
        point = tuple(sorted((k, round(float(run.data.params[k]), 9)) for k in ("model.isr_p.k", "model.isr_p.bias")))
        ended[point] = (TrialState.COMPLETE if status == "finished" else TrialState.PRUNED, history)

    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    trials = optuna.load_study(study_name=NAME, storage=url).trials
    stored = {}
    for trial in trials:
        point = tuple(sorted((k, round(float(v), 9)) for k, v in trial.params.items()))
        assert point not in stored, f"one point told to Optuna twice: {point}"
        stored[point] = (trial.state, trial.intermediate_values)
    assert stored == ended, json.dumps({"optuna": str(stored), "tune": str(ended)})
    # and in the database itself: one row per trial and epoch
    rows = postgres_server.query(
        "SELECT trial_id, step, count(*) FROM trial_intermediate_values GROUP BY trial_id, step", (), database
    )
    assert len(rows) == sum(len(h) for _, h in ended.values()) and all(n == 1 for _, _, n in rows), rows
