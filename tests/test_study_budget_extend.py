"""Study economics end to end on tiny studies, each with a driver killed in the middle and
`pisa study resume` after it: a budget the study keeps, `pisa study extend`, and `pisa study
run --warm-start`. One pilot study (2 trials, FIFO) is trained once for all three: its epochs
price the budget, the extension adds to it, the warm start starts from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import mlflow_client, write_study

PISA = [sys.executable, "-m", "pisa.cli"]
SPACE = {
    "model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0},
    "model.isr_p.bias": {"type": "uniform", "low": 0.0, "high": 0.5},
}

pytestmark = pytest.mark.slow


def _pisa(cwd: Path, args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kill_at:
        env["PISA_DRIVER_FAULTS"] = json.dumps({"kill_at": kill_at})
    return subprocess.run(
        PISA + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True
    )


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-5000:]
    return out


def _epochs(client, run_id: str) -> dict[int, tuple[float, int]]:
    """{epoch: (train + eval s, when it was logged)} of one trial run, as MLflow has it."""
    train = {m.step: m for m in client.get_metric_history(run_id, "time_train_s")}
    evals = {m.step: m.value for m in client.get_metric_history(run_id, "time_eval_s")}
    return {step: (m.value + evals.get(step, 0.0), m.timestamp) for step, m in train.items()}


def _state(root: Path, name: str) -> dict:
    return json.loads((root / "ray_results" / name / "pisa_study.json").read_text())


def _optuna(root: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")


@pytest.fixture(scope="module")
def pilot(tmp_path_factory, synthetic_dir):
    """2 trials of 2 epochs, both at once, FIFO: 4 trial-epochs; its epoch times price the others."""
    root = tmp_path_factory.mktemp("economics")
    path = write_study(root, synthetic_dir, "pilot", num_samples=2, scheduler={"type": "fifo"}, search_space=SPACE)
    out = _ok(_pisa(root, ["study", "run", str(path)]))
    assert "plan vs actual: 4 trial-epochs, planned 4 (FIFO)" in out, out[-3000:]
    return root


def test_a_budget_below_the_asha_lower_bound_stops_on_budget_across_a_kill(pilot, synthetic_dir):
    client = mlflow_client(f"sqlite:///{pilot / 'mlflow.db'}")
    pilot_state = _state(pilot, "pilot")
    pilot_runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        f"tags.`mlflow.parentRunId` = '{pilot_state['parent_run_id']}'",
    )
    epoch_s = [s for run in pilot_runs for s, _ in _epochs(client, run.info.run_id).values()]
    mean_epoch = sum(epoch_s) / len(epoch_s)
    # 4 trials, 2 at a time, ASHA (grace 1, factor 2): at least 4 + 2 = 6 trial-epochs. The budget
    # pays 4.5 of the pilot's epochs, 1 CPU each: below that bound, so the study must stop on it
    budget_s = 4.5 * mean_epoch
    work = pilot / "capped"
    work.mkdir()
    path = write_study(work, synthetic_dir, "capped", search_space=SPACE, budget={"hours": budget_s / 3600})
    # the same store and storage as the pilot: its runs are the "earlier run" that prices the plan
    spec = yaml.safe_load(path.read_text())
    base = yaml.safe_load((work / "base.yaml").read_text())
    base["tracking"]["uri"] = f"sqlite:///{pilot / 'mlflow.db'}"
    base["storage_path"] = str(pilot / "ray_results")
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    path.write_text(yaml.safe_dump(spec))

    first = _pisa(work, ["study", "run", str(path)], kill_at="trial_complete:1")
    _ok(first, -9)
    second = _ok(_pisa(work, ["study", "resume", "capped", "--storage-path", str(pilot / "ray_results")]))
    assert "stopped on budget" in second, second[-3000:]
    assert "study interrupted" not in second

    parent = _state(pilot, "capped")["parent_run_id"]
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    # every epoch MLflow recorded, in the order it was logged
    logged = sorted(
        (when, seconds, run.info.run_id) for run in runs for seconds, when in _epochs(client, run.info.run_id).values()
    )
    assert sum(1 for _ in logged) < 6  # fewer trial-epochs than ASHA's least work: the budget ended it
    spent = sum(seconds for _, seconds, _ in logged)
    # the epoch at which the running total first reached the budget, and those logged after it: at
    # most one per trial still running then (each at most one epoch past the budget)
    total, crossing = 0.0, None
    for i, (_, seconds, _) in enumerate(logged):
        total += seconds
        if total >= budget_s:
            crossing = i
            break
    if crossing is None:
        assert spent < budget_s
    else:
        after = logged[crossing:]
        per_trial = [run_id for _, _, run_id in after]
        assert len(per_trial) == len(set(per_trial)), after
        assert spent <= sum(s for _, s, _ in logged[:crossing]) + sum(s for _, s, _ in after)
        assert sum(s for _, s, _ in logged[:crossing]) < budget_s
    study_run = client.get_run(parent)
    assert study_run.info.status == "FINISHED" and study_run.data.tags["pisa.status"] == "finished"
    assert study_run.data.metrics["budget_spent_hours"] == pytest.approx(spent / 3600, rel=1e-6)
    assert "stopped on budget" in study_run.data.tags["pisa.budget"]


def test_extend_adds_trials_to_the_same_searches_and_runs_across_a_kill(pilot):
    client = mlflow_client(f"sqlite:///{pilot / 'mlflow.db'}")
    before = _state(pilot, "pilot")
    parent = before["parent_run_id"]
    old = {t.number: t.params for t in _optuna(pilot, "pilot").trials}
    experiment = client.get_experiment_by_name("tests").experiment_id
    old_runs = {r.info.run_id for r in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert len(old_runs) == 2

    first = _pisa(pilot, ["study", "extend", "pilot", "--add", "2"], kill_at="trial_complete:1")
    out = _ok(first, -9)
    assert "extending study pilot: 2 more trial(s), 2 done before, 4 in all" in out
    assert "trial 3/4 started" in out and "trial 1/4 started" not in out  # counted on from the pilot's 2
    out = _ok(_pisa(pilot, ["study", "resume", "pilot"]))
    assert "plan vs actual: 8 trial-epochs, planned 8 (FIFO)" in out, out[-3000:]

    after = _state(pilot, "pilot")
    assert after["parent_run_id"] == parent and after["num_samples"] == 4 and after["tune_runs"] == ["extend-1"]
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 4 and old_runs < {r.info.run_id for r in runs}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["pisa.status"] == "finished"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "bbox_mAP")] == [1, 2]
    assert client.get_run(parent).info.status == "FINISHED"
    trials = _optuna(pilot, "pilot").trials  # the same Optuna study: the 2 old trials, then 2 new
    assert len(trials) == 4 and {t.number: t.params for t in trials[:2]} == old
    assert all(t.state.name == "COMPLETE" for t in trials)


def test_warm_start_seeds_the_searcher_with_the_pilot_across_a_kill(pilot, synthetic_dir):
    pilot_trials = [t for t in _optuna(pilot, "pilot").trials if t.state.name in ("COMPLETE", "PRUNED")]
    best = max(pilot_trials, key=lambda t: t.value)
    work = pilot / "seeded"
    work.mkdir()
    path = write_study(work, synthetic_dir, "seeded", num_samples=2, max_concurrent_trials=1, search_space=SPACE)
    base = yaml.safe_load((work / "base.yaml").read_text())
    base["tracking"]["uri"] = f"sqlite:///{pilot / 'mlflow.db'}"
    base["storage_path"] = str(pilot / "ray_results")
    (work / "base.yaml").write_text(yaml.safe_dump(base))

    first = _pisa(work, ["study", "run", str(path), "--warm-start", "pilot"], kill_at="trial_complete:1")
    out = _ok(first, -9)
    assert f"warm start: {len(pilot_trials)} trials of study pilot" in out, out[-3000:]
    _ok(_pisa(work, ["study", "resume", "seeded", "--storage-path", str(pilot / "ray_results")]))

    trials = _optuna(pilot, "seeded").trials
    seeded = [t for t in trials if t.user_attrs.get("warm_start_from") == "pilot"]
    own = [t for t in trials if "warm_start_from" not in t.user_attrs]
    # the pilot's trials, once (not again after the kill), before any of its own
    assert len(seeded) == len(pilot_trials) and trials[: len(seeded)] == seeded
    assert sorted((t.params["model.isr_p.k"], t.value) for t in seeded) == sorted(
        (t.params["model.isr_p.k"], t.value) for t in pilot_trials
    )
    assert len(own) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in own)  # ASHA may prune
    # its first point is the pilot's best (enqueued), not the paper's defaults nor a random one
    assert own[0].system_attrs.get("fixed_params") == best.params
    # the later point was proposed with >= 2 finished trials in the record (TPE's start-up for
    # 2 trials is max(2, 2 // 4) = 2, cut to the pilot's count): from the sampler's model
    for t in own[1:]:
        assert "fixed_params" not in t.system_attrs
        finished_before = [
            s for s in trials if s.datetime_complete is not None and s.datetime_complete <= t.datetime_start
        ]
        assert len(finished_before) >= 2
    client = mlflow_client(f"sqlite:///{pilot / 'mlflow.db'}")
    parent = _state(pilot, "seeded")["parent_run_id"]
    assert client.get_run(parent).data.tags["pisa.warm_start_from"] == "pilot"
    assert _state(pilot, "seeded")["warm_start_from"] == "pilot"
