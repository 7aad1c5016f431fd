"""Rung fidelity: Spearman against SciPy, the rungs against Ray's ASHA, the per-rung values
from a real MLflow store, and what `pisa study best` / `report` say of a study built in
MLflow by hand (no training, no data: one SQLite store for the module, whose creation is
most of the time)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from helpers import mlflow_client, write_study
from scipy import stats

from pisa import cli, tracking
from pisa.search.fidelity import Fidelity, Rung, measure, ranks, rung_epochs, spearman
from pisa.search.schema import SchedulerConfig
from pisa.search.state import save_state
from pisa.search.study import load_study
from pisa.tracking import tags as tag

# ---------------------------------------------------------------- Spearman


def test_ranks_average_ties_as_scipy():
    rng = random.Random(1)
    for _ in range(50):
        values = [rng.randint(0, 4) for _ in range(rng.randint(1, 12))]
        assert ranks(values) == pytest.approx(list(stats.rankdata(values)))


def test_spearman_matches_scipy_on_random_data_with_ties():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        n = rng.randint(2, 15)
        x = [rng.choice([0.0, 0.01, 0.02, 0.03, rng.random()]) for _ in range(n)]
        y = [rng.choice([0.1, 0.2, rng.random()]) for _ in range(n)]
        expected = stats.spearmanr(x, y).statistic
        if math.isnan(expected):  # a constant side: undefined
            assert spearman(x, y) is None
        else:
            assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
            checked += 1
    assert checked > 200


def test_spearman_is_undefined_for_constant_or_too_few_values():
    assert spearman([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None
    assert spearman([1.0], [2.0]) is None
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


# ---------------------------------------------------------------- rungs


@pytest.mark.parametrize(
    ("grace", "factor", "epochs", "expected"),
    [
        (1, 2, 12, [1, 2, 4, 8]),
        (4, 2, 12, [4, 8]),
        (1, 2, 8, [1, 2, 4]),  # the rung at the last epoch decides nothing
        (2, 3, 20, [2, 6, 18]),
        (2, 1.5, 12, [2, 3, 5, 7, 11]),  # fractional rungs act at the next whole epoch
        (1, 1.5, 5, [1, 2, 3, 4]),  # 1.5 and 2.25 act at 2 and 3
        (5, 2, 5, []),  # grace = epochs: ASHA stops nothing
        (8, 2, 5, []),  # capped at the epochs, as the tuner does
    ],
)
def test_asha_rungs(grace, factor, epochs, expected):
    cfg = SchedulerConfig(type="asha", grace_period=grace, reduction_factor=factor)
    assert rung_epochs(cfg, epochs) == expected


def test_asha_rungs_are_where_rays_bracket_puts_them():
    from ray.tune.schedulers.async_hyperband import _Bracket  # what the tuner's ASHAScheduler uses

    for grace, factor, epochs in [(1, 2, 12), (4, 2, 12), (2, 3, 20), (1, 3, 9), (3, 2, 24), (2, 2.5, 40), (1, 1.5, 7)]:
        milestones = [m for m, _ in _Bracket(min(grace, epochs), epochs, factor, s=0)._rungs]
        cfg = SchedulerConfig(type="asha", grace_period=grace, reduction_factor=factor)
        assert rung_epochs(cfg, epochs) == sorted({math.ceil(m) for m in milestones if math.ceil(m) < epochs})


def test_fifo_rungs_are_every_epoch_before_the_last():
    assert rung_epochs(SchedulerConfig(type="fifo"), 5) == [1, 2, 3, 4]
    assert rung_epochs(SchedulerConfig(type="fifo"), 1) == []


# ---------------------------------------------------------------- the warning line


def _fidelity(kind: str, grace: Rung | None, *later: Rung, finished: int = 4) -> Fidelity:
    rungs = ([grace] if grace else []) + list(later)
    return Fidelity("bbox_mAP", SchedulerConfig(type=kind, grace_period=1), 12, finished, rungs)


def test_warning_when_the_grace_period_ranks_poorly_or_cannot_be_computed():
    poor = _fidelity("asha", Rung(1, 0.3159, 4), Rung(2, 0.8, 4))
    assert poor.warning() == (
        "warning: ASHA's grace period (epoch 1) ranks trials poorly: Spearman 0.32 over 4 finished trials; "
        "use a longer scheduler.grace_period (epoch 2: 0.80) or seeds: 2"
    )
    few = _fidelity("asha", Rung(1, None, 2), finished=2)
    assert "Spearman cannot be computed over 2 finished trial(s), 3 needed" in (few.warning() or "")
    constant = _fidelity("asha", Rung(1, None, 5), finished=5)
    assert "the metric is constant over 5 finished trials" in (constant.warning() or "")
    assert _fidelity("asha", Rung(1, 0.5, 4)).warning() is None
    assert _fidelity("fifo", Rung(1, -0.9, 4)).warning() is None  # FIFO stopped nothing on it
    assert _fidelity("asha", None).warning() is None  # no rung before the last epoch


# ---------------------------------------------------------------- from a real MLflow store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store for the module's studies (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('fidelity') / 'mlflow.db'}"


def test_per_rung_correlation_from_mlflow_metric_histories(store, tmp_path):
    from mlflow import MlflowClient

    uri = store
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("histories", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, run_name="study").info.run_id
    # epoch -> bbox_mAP; the finished ones reach epoch 4, with ties at epoch 1
    histories = {
        "a": [0.02, 0.10, 0.20, 0.40],
        "b": [0.03, 0.05, 0.30, 0.35],
        "c": [0.02, 0.12, 0.25, 0.30],
        "d": [0.01, 0.09, 0.10, 0.45],
        "e": [0.03, 0.11, 0.15, 0.20],
        "nan": [0.05, 0.2, 0.3, float("nan")],  # diverged at the end: not a finisher
        "stopped": [0.04, 0.01],  # ASHA stopped it
    }
    ids = {}
    for name, values in histories.items():
        run_id = c.create_run(exp, run_name=name, tags={tag.PARENT_RUN_ID: parent}).info.run_id
        for epoch, value in enumerate(values, 1):
            c.log_metric(run_id, "bbox_mAP", value, timestamp=1000 + epoch, step=epoch)
        ids[name] = run_id
    # epoch 2 of `a` logged again later (a resumed trial): the latest value counts
    c.log_metric(ids["a"], "bbox_mAP", 0.13, timestamp=5000, step=2)
    histories["a"][1] = 0.13

    run_ids = [r.info.run_id for r in tracking.tracker(uri).children("histories", parent)]
    assert sorted(run_ids) == sorted(ids.values())
    cfg = SchedulerConfig(type="fifo")
    got = measure(uri, run_ids, "bbox_mAP", cfg, epochs=4)

    finishers = ["a", "b", "c", "d", "e"]
    final = [histories[n][3] for n in finishers]
    assert got.finished == 5 and [r.epoch for r in got.rungs] == [1, 2, 3]
    for rung in got.rungs:
        expected = stats.spearmanr([histories[n][rung.epoch - 1] for n in finishers], final).statistic
        assert rung.trials == 5
        assert rung.spearman == pytest.approx(expected, abs=1e-12)
    assert got.metrics()["rung_fidelity.epoch_1"] == pytest.approx(got.rungs[0].spearman)
    assert got.metrics()["rung_fidelity.finished_trials"] == 5

    # two finishers: nothing can be computed
    few = measure(uri, [ids["a"], ids["b"], ids["stopped"]], "bbox_mAP", cfg, epochs=4)
    assert few.finished == 2 and all(r.spearman is None and r.trials == 2 for r in few.rungs)


# ---------------------------------------------------------------- `pisa study best` and `report`

# finished trials' bbox_mAP by epoch (4 epochs): epoch 1 ranks them poorly, epoch 2 well
FINISHED = {
    "t0": [0.02, 0.10, 0.20, 0.40],
    "t1": [0.03, 0.06, 0.30, 0.35],
    "t2": [0.01, 0.08, 0.25, 0.30],
    "t3": [0.04, 0.05, 0.10, 0.20],
}
STOPPED = {"t4": [0.01], "t5": [0.00]}


def _study_in_mlflow(tmp: Path, uri: str, scheduler: dict) -> tuple[str, str, str]:
    """A study's state and MLflow runs as a finished study leaves them (its data is never
    read); its name, storage path and parent run."""
    path = write_study(tmp, tmp / "data", "fid", uri, scheduler=scheduler, experiment={"train": {"epochs": 4}})
    study = load_study(path)
    t = tracking.tracker(uri)
    parent = t.start_run("tests", "study fid", tags={tag.KIND: tag.Kind.STUDY, tag.STUDY: "fid"})
    save_state(study, parent, uri)
    for i, (trial, values) in enumerate({**FINISHED, **STOPPED}.items()):
        status = tag.Status.FINISHED if len(values) == 4 else tag.Status.STOPPED_EARLY
        run = t.start_run(
            "tests",
            trial,
            params={"model.isr_p.k": 0.5 + i * 0.3, "model.isr_p.bias": 0.05 * i},
            tags={
                tag.TRIAL: trial,
                tag.STATUS: status,
                tag.SEARCHED: "model.isr_p.k,model.isr_p.bias",
                tag.EPOCHS: str(len(values)),
                tag.best("bbox_mAP"): str(max(values)),
            },
            parent_run_id=parent,
        )
        for epoch, value in enumerate(values, 1):
            t.log_metrics(run, {"bbox_mAP": value}, epoch)
        t.end_run(run)
    return "fid", str(tmp / "ray_results"), parent


def _expected(epoch: int) -> float:
    return stats.spearmanr([v[epoch - 1] for v in FINISHED.values()], [v[3] for v in FINISHED.values()]).statistic


def test_study_best_warns_when_ashas_grace_period_ranks_poorly(store, tmp_path, capsys, monkeypatch):
    name, storage_path, parent = _study_in_mlflow(tmp_path, store, {"type": "asha", "grace_period": 1})
    rho = _expected(1)
    assert rho < 0.5 <= _expected(2)
    assert cli.main(["study", "best", name, "--storage-path", storage_path]) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: ASHA's grace period (epoch 1) ranks trials poorly: Spearman {rho:.2f} over 4 finished trials; "
        f"use a longer scheduler.grace_period (epoch 2: {_expected(2):.2f}) or seeds: 2"
    ) in err.splitlines()

    # the report puts the rungs on the study's run: metrics and a table (its plots are
    # tests/test_study.py's: skipped for time)
    monkeypatch.setattr("pisa.search.report.write_plots", lambda *args: [])
    assert cli.main(["study", "report", name, "--storage-path", storage_path]) == 0
    metrics = mlflow_client(store).get_run(parent).data.metrics
    assert metrics["rung_fidelity.epoch_1"] == pytest.approx(rho)
    assert metrics["rung_fidelity.epoch_2"] == pytest.approx(_expected(2))
    assert metrics["rung_fidelity.finished_trials"] == 4
    arts = {a.path for a in mlflow_client(store).list_artifacts(parent, "report")}
    assert "report/rung_fidelity.csv" in arts


@pytest.mark.parametrize("scheduler", [{"type": "asha", "grace_period": 2}, {"type": "fifo"}])
def test_study_best_says_nothing_when_the_grace_period_ranks_well_or_for_fifo(store, tmp_path, capsys, scheduler):
    name, storage_path, _ = _study_in_mlflow(tmp_path, store, scheduler)
    assert cli.main(["study", "best", name, "--storage-path", storage_path]) == 0
    assert "warning" not in capsys.readouterr().err
