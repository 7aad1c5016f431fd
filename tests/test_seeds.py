"""Seeds as a study feature: `seeds: N` per point, `pisa study validate`, noise in `study best`.

Real Ray Tune + Train, real MLflow (SQLite); tiny synthetic data, 1 epoch, 2 seeds. The
study metric is the final train loss (mode min): unlike the AP of a 1-epoch detector it
differs from seed to seed, so the per-seed bookkeeping is checked on distinct values.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import children, mlflow_client, write_study
from scipy import stats as sps

from pisa import cli, tracking
from pisa.core.config import ConfigError
from pisa.search.results import collect
from pisa.search.state import load_state
from pisa.search.study import load_study
from pisa.search.tuner import run_study
from pisa.trials.capacity import cluster_totals
from pisa.trials.seeds import mean_report


def test_mean_report_averages_seeds_and_keeps_each_value():
    reports = {
        3: {"epoch": 2, "bbox_mAP": 0.30, "train_loss": 1.0, "checkpoint_path": "/c3"},
        4: {"epoch": 2, "bbox_mAP": 0.20, "train_loss": 2.0, "checkpoint_path": "/c4"},
    }
    out = mean_report(reports, "bbox_mAP")
    assert out["bbox_mAP"] == pytest.approx(0.25) and out["train_loss"] == pytest.approx(1.5)
    assert out["seed_3/bbox_mAP"] == 0.30 and out["seed_4/bbox_mAP"] == 0.20
    assert out["bbox_mAP_seed_std"] == pytest.approx(math.sqrt(0.005))
    assert out["epoch"] == 2 and out["seeds"] == 2 and out["checkpoint_path"] == "/c3"
    nan = mean_report({0: {"epoch": 1, "train_loss": float("nan")}, 1: {"epoch": 1, "train_loss": 1.0}}, "train_loss")
    assert math.isnan(nan["train_loss"])


@pytest.fixture(scope="module")
def seeded_study(ray_local, synthetic_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeded")
    path = write_study(
        tmp,
        synthetic_dir,
        "seeded",
        num_samples=2,
        seeds=2,
        metric="train_loss",
        mode="min",
        scheduler={"type": "fifo"},
    )
    base = yaml.safe_load((tmp / "base.yaml").read_text())
    base["train"].update(epochs=1, seed=7)
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    study = load_study(path)
    assert study.seeds() == [7, 8]
    assert study.capacity(cluster_totals()).at_once == 1  # 2 seeds x 1 worker on 2 CPUs: one point at a time
    return tmp, study, run_study(study)


@pytest.mark.slow
def test_a_point_trains_every_seed_and_ranks_by_their_mean(seeded_study):
    tmp, study, outcome = seeded_study
    uri = outcome.tracking_uri
    runs = children(uri, "tests", outcome.parent_run_id)
    assert len(runs) == 2
    client = mlflow_client(uri)
    for run in runs:
        run_id = run.info.run_id
        per_seed = {s: [m.value for m in client.get_metric_history(run_id, f"seed_{s}/train_loss")] for s in (7, 8)}
        assert all(len(v) == 1 for v in per_seed.values()), per_seed
        a, b = per_seed[7][0], per_seed[8][0]
        assert a != b  # the seed changes the training
        mean = [m.value for m in client.get_metric_history(run_id, "train_loss")]
        assert mean == [pytest.approx((a + b) / 2)]
        assert json.loads(run.data.tags["pisa.seed_values"]) == {"7": pytest.approx(a), "8": pytest.approx(b)}
        assert float(run.data.tags["pisa.best_train_loss"]) == pytest.approx((a + b) / 2, rel=1e-5)
    ranked = collect(outcome.name, uri, "tests", outcome.parent_run_id, "train_loss", "min").trials
    assert ranked[0].metric <= ranked[1].metric
    assert all(len(t.seed_values) == 2 for t in ranked)


@pytest.mark.slow
def test_best_says_whether_the_winner_is_within_the_noise(seeded_study, monkeypatch, capsys):
    tmp, study, outcome = seeded_study
    monkeypatch.chdir(tmp)
    code = cli.main(["study", "best", "seeded"])
    out, err = capsys.readouterr()
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "runner-up" in ln)
    # the verdict, worked out here from the two points' per-seed values in MLflow: a paired
    # t interval (scipy) over the seeds both share; significant when it excludes zero
    ranked = collect(outcome.name, outcome.tracking_uri, "tests", outcome.parent_run_id, "train_loss", "min").trials
    first, second = ranked[0].seed_values, ranked[1].seed_values
    diffs = [first[s] - second[s] for s in sorted(first)]
    mean, sem = sum(diffs) / len(diffs), sps.sem(diffs)
    low, high = sps.t.interval(0.95, len(diffs) - 1, loc=mean, scale=sem)
    import re

    shown = re.search(r"paired difference ([-+.\d]+), 95% CI \[([-+.\d]+), ([-+.\d]+)\] over 2 seeds", line)
    assert shown, line
    assert [float(x) for x in shown.groups()] == pytest.approx([mean, low, high], abs=2e-4), line
    expected = "beyond the seed noise" if (low > 0 or high < 0) else "within the noise"
    assert expected in line, line


@pytest.mark.slow
def test_validate_compares_with_intervals_and_logs_a_linked_run(seeded_study, monkeypatch, capsys):
    tmp, study, outcome = seeded_study
    monkeypatch.chdir(tmp)  # in this process: it joins the session's Ray
    code = cli.main(["study", "validate", "seeded", "--top", "1", "--seeds", "2"])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "paired diff vs baseline" in out and "baseline" in out
    uri = outcome.tracking_uri
    state = load_state("seeded", tmp / "ray_results")
    parent = mlflow_client(uri).get_run(state.parent_run_id)
    vid = parent.data.tags["pisa.validation_run_id"]
    vrun = mlflow_client(uri).get_run(vid)
    assert vrun.data.tags["pisa.study_run_id"] == state.parent_run_id and vrun.info.status == "FINISHED"
    arts = {a.path for a in mlflow_client(uri).list_artifacts(vid, "validation")}
    assert {
        "validation/validation.txt",
        "validation/validation.csv",
        "validation/per_seed.json",
        "validation/per_seed.png",
    } <= arts
    # fresh seeds (after the study's 7 and 8), the same for every variant
    client = mlflow_client(uri)
    per_seed = json.loads(Path(client.download_artifacts(vid, "validation/per_seed.json", str(tmp))).read_text())
    variants = sorted({r["variant"] for r in per_seed})
    assert "baseline" in variants and any(v.startswith("paper defaults") for v in variants)
    assert any("#1 " in v for v in variants)  # the study's best trial, alone or as paper defaults
    assert {r["seed"] for r in per_seed} == {9, 10}
    values = {v: {r["seed"]: r["train_loss"] for r in per_seed if r["variant"] == v} for v in variants}
    assert all(len(v) == 2 and all(x is not None for x in v.values()) for v in values.values())
    # each seed's value is a real training, nested under the validation run
    nested = children(uri, "tests", vid)
    assert len(nested) == 2 * len(variants)
    # intervals and paired differences, recomputed with SciPy
    table = Path(client.download_artifacts(vid, "validation/validation.csv", str(tmp))).read_text()
    rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(table))}
    base = values["baseline"]
    for name, vals in values.items():
        row = rows[name]
        xs = [vals[s] for s in sorted(vals)]
        low, high = sps.t.interval(0.95, len(xs) - 1, loc=sum(xs) / len(xs), scale=sps.sem(xs))
        assert float(row["mean"]) == pytest.approx(sum(xs) / len(xs))
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), rel=1e-6)
        if name == "baseline":
            continue
        diffs = [vals[s] - base[s] for s in sorted(vals)]
        low, high = sps.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / len(diffs), scale=sps.sem(diffs))
        assert (float(row["diff_ci_low"]), float(row["diff_ci_high"])) == pytest.approx((low, high), rel=1e-6)
        assert int(row["wins"]) == sum(d < 0 for d in diffs)  # mode min: lower loss wins


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, args, message",
    [
        ("seeded", ["--seeds", "0"], "--seeds 0: must be at least 1"),
        ("seeded", ["--top", "5"], "--top 5: study 'seeded' has only 2 ranked trial(s)"),
        ("no-such-study", [], "no study 'no-such-study'"),
    ],
)
def test_validate_bad_input_is_one_line_exit_2(seeded_study, monkeypatch, capsys, name, args, message):
    tmp, study, outcome = seeded_study
    runs_before = len(tracking.tracker(outcome.tracking_uri).find_runs("tests"))
    monkeypatch.chdir(tmp)
    code = cli.main(["study", "validate", name, *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert len(tracking.tracker(outcome.tracking_uri).find_runs("tests")) == runs_before  # nothing started


def test_seeds_that_cannot_fit_the_cluster_fail_before_any_trial(ray_local, synthetic_dir, tmp_path):
    study = load_study(write_study(tmp_path, synthetic_dir, "toowide", seeds=3))
    with pytest.raises(ConfigError, match="3 seeds x 1 worker"):
        study.capacity(cluster_totals())
