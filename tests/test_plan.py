"""`pisa study plan`: a study's cost before it starts. The expected numbers are worked out
by hand in each test (rungs, surviving trials, waves), not with the module's formulas."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mlflow_client, tiny_experiment, write_study

from pisa.core.errors import ConfigError
from pisa.planning.cluster_capacity import Cluster, assumed_cluster
from pisa.planning.cost_plan import asha_rungs, make_plan, plan_study, trials_at_once
from pisa.planning.training_rate import Rate, rate_from_mlflow, rate_params
from pisa.search.study import load_study

PISA = [sys.executable, "-m", "pisa.cli"]
CPUS = Cluster(gpus=0, cpus=16, where="a test cluster")


def _study(tmp_path: Path, data_dir: Path, overrides: list[str] | None = None, **spec):
    return load_study(write_study(tmp_path, data_dir, "plan", **spec), overrides)


# ---------------------------------------------------------------- the arithmetic


def test_cpu_study_fifo_and_asha_by_hand(tmp_path, synthetic_dir):
    # 8 trials x 4 epochs, 2 at a time, 1 CPU worker each; ASHA grace 1, factor 2
    study = _study(
        tmp_path,
        synthetic_dir,
        ["train.epochs=4"],
        num_samples=8,
        max_concurrent_trials=2,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    rate = Rate(images_per_sec=2.0, source="test", eval_s=1.0)
    plan = make_plan(study.workload(), CPUS, images=20, rate=rate)
    # an epoch: 20 images at 2 img/s + 1 s of evaluation
    epoch_s = 20 / 2.0 + 1.0
    assert plan.epoch_s == pytest.approx(epoch_s)
    assert (plan.at_once, plan.kind, plan.iters_per_epoch) == (2, "CPU", 10)  # 20 images / 2 per step
    # FIFO: every trial trains 4 epochs; 4 waves of 2 trials, 4 epochs each
    assert plan.fifo.trial_epochs == 32
    assert plan.fifo.hours == pytest.approx(32 * epoch_s / 3600)
    assert plan.fifo.wall_s == pytest.approx(16 * epoch_s)
    # ASHA: rungs at epochs 1 and 2 (4 is the end): 8 trials train epoch 1, 4 epoch 2, 2 epochs 3-4
    assert plan.rungs == [1, 2]
    assert plan.asha is not None
    assert plan.asha.trial_epochs == 8 * 1 + 4 * 1 + 2 * 2
    assert plan.asha.hours == pytest.approx(16 * epoch_s / 3600)
    # in waves of 2: 4 waves of 1 epoch, 2 waves of 1 epoch, 1 wave of 2 epochs
    assert plan.asha.wall_s == pytest.approx((4 + 2 + 2) * epoch_s)
    line = plan.line()
    assert line.startswith("plan: 8 trials x 4 epochs, 2 at a time, 20 images/epoch")
    assert "CPU-hours" in line and "(FIFO)" in line and "ASHA" in line and "from test" in line


def test_gpu_study_with_seeds_by_hand(tmp_path, synthetic_dir):
    # 9 points x 2 seeds x 12 epochs; 2 GPU workers per training; ASHA grace 2, factor 3
    study = _study(
        tmp_path,
        synthetic_dir,
        ["train.epochs=12"],
        num_samples=9,
        max_concurrent_trials=4,
        seeds=2,
        resources_per_trial={"workers": 2, "gpus_per_worker": 1},
        scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 3},
    )
    plan = make_plan(study.workload(), assumed_cluster(8), images=25, rate=Rate(images_per_sec=10.0, source="test"))
    # 8 GPUs hold 4 trainings of 2 GPUs: 2 points of 2 seeds at a time
    assert (plan.at_once, plan.kind, plan.batch) == (2, "GPU", 4)
    # each worker trains ceil(25 / 2) = 13 images: 26 at 10 img/s, no evaluation time known
    epoch_s = 2.6
    assert plan.iters_per_epoch == 7  # 13 images, 2 per step
    gpus = 2 * 2  # a point holds 2 seeds x 2 GPUs
    assert plan.fifo.trial_epochs == 9 * 12
    assert plan.fifo.hours == pytest.approx(108 * epoch_s * gpus / 3600)
    assert plan.fifo.wall_s == pytest.approx(5 * 12 * epoch_s)  # 5 waves (2+2+2+2+1) of 12 epochs
    # rungs at 2 and 6 (18 is past the end): 9 trials x 2 epochs, 3 x 4, 1 x 6
    assert plan.rungs == [2, 6]
    assert plan.asha is not None
    assert plan.asha.trial_epochs == 18 + 12 + 6
    assert plan.asha.hours == pytest.approx(36 * epoch_s * gpus / 3600)
    assert plan.asha.wall_s == pytest.approx((5 * 2 + 2 * 4 + 1 * 6) * epoch_s)


def test_fifo_study_and_unknown_rate(tmp_path, synthetic_dir):
    study = _study(tmp_path, synthetic_dir, ["train.epochs=3"], num_samples=5, scheduler={"type": "fifo"})
    plan = make_plan(study.workload(), CPUS, images=8, rate=None, rate_note="no earlier run")
    assert plan.asha is None and plan.fifo.hours is None and plan.fifo.wall_s is None
    assert plan.fifo.trial_epochs == 15 and plan.fifo.wave_epochs == 3 * 3  # 5 trials, 2 at a time: 3 waves
    assert plan.line().endswith("15 trial-epochs (FIFO); rate unknown (no earlier run)")
    text = plan.text()
    assert "unknown: no earlier run" in text and "FIFO" in text and "ASHA" not in text


def test_no_trial_fits_no_wall_time(tmp_path, synthetic_dir):
    # a joined cluster may wait for an autoscaler: the hours are known, the wall time is not
    study = _study(tmp_path, synthetic_dir, resources_per_trial={"workers": 2, "gpus_per_worker": 1})
    plan = make_plan(study.workload(), Cluster(gpus=1, cpus=8, where="test"), images=8, rate=Rate(4.0, "test"))
    assert plan.at_once == 0 and plan.fifo.wall_s is None
    assert plan.fifo.hours == pytest.approx(4 * 2 * (8 / 4.0) * 2 / 3600)  # 8 trial-epochs of 2 s on 2 GPUs
    assert ", 0 at a time," in plan.line() and "? wall (FIFO)" in plan.line()


def test_asha_rungs_are_ray_tunes():
    from ray.tune.schedulers.async_hyperband import _Bracket  # imports Ray, starts nothing

    for max_t, grace, rf in [(4, 1, 2), (12, 1, 2), (12, 2, 3), (12, 4, 2), (6, 6, 2), (10, 1, 1.5), (20, 3, 4)]:
        bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
        ray_rungs = sorted({math.ceil(m) for m, _ in bracket._rungs if math.ceil(m) < max_t})
        assert asha_rungs(max_t, grace, rf) == ray_rungs, (max_t, grace, rf)


# ---------------------------------------------------------------- the cluster


def test_gpus_option_sets_the_concurrency_without_ray(tmp_path, synthetic_dir, no_ray, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    study = _study(
        tmp_path,
        synthetic_dir,
        num_samples=6,
        max_concurrent_trials=4,
        resources_per_trial={"workers": 2, "gpus_per_worker": 1},
    )
    assert [trials_at_once(study.workload(), assumed_cluster(n)) for n in (2, 3, 4, 8, 64)] == [1, 1, 2, 4, 4]
    plan = plan_study(study.workload(), gpus=5)
    assert plan.at_once == 2 and plan.cluster.gpus == 5 and "--gpus" in plan.cluster.where
    with pytest.raises(ConfigError, match=r"plan\.yaml: resources_per_trial: a trial needs 2 GPUs"):
        plan_study(study.workload(), gpus=1)


# ---------------------------------------------------------------- the rate


def _log_run(client, experiment_id: str, params: dict, rates: list[float], start: int, evals=()) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, start_time=start, run_name=f"run@{start}")
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, "None" if v is None else str(v)) for k, v in params.items()])
    metrics = [Metric("images_per_sec", r, start, i + 1) for i, r in enumerate(rates)]
    metrics += [Metric("time_eval_s", e, start, i + 1) for i, e in enumerate(evals)]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_rate_from_an_earlier_run_in_mlflow(tmp_path, synthetic_dir):
    from mlflow import MlflowClient

    study = _study(tmp_path, synthetic_dir)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    assert rate_from_mlflow(study.workload(), uri)[0] is None  # no store yet: none is created
    assert not (tmp_path / "store" / "mlflow.db").exists()

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("earlier")
    other_exp = client.create_experiment("elsewhere")
    same = study.base_config.flat_params()
    older = _log_run(client, exp, same, [1.0, 1.0], start=1_000)
    match = _log_run(client, other_exp, same, [1.0, 4.0, 5.0], start=2_000, evals=[2.0, 3.0, 2.0])
    # newer runs that must not count: another backbone, another layout, no rate logged
    _log_run(client, exp, {**same, "model.backbone": "resnet50_fpn"}, [100.0], start=3_000)
    _log_run(client, exp, {**same, "train.images_per_worker": 8}, [100.0], start=4_000)
    _log_run(client, exp, same, [], start=5_000)
    # a searched key is not compared: the trials of a study differ there
    assert (
        "model.isr_p.k" not in rate_params(study.workload())
        and rate_params(study.workload())["model.detector"] == "faster_rcnn"
    )

    rate, note = rate_from_mlflow(study.workload(), uri)
    assert rate is not None and note == ""
    assert rate.run_id == match and rate.run_id != older
    assert rate.images_per_sec == pytest.approx(4.0)  # the median over its epochs
    assert rate.eval_s == pytest.approx(2.0)
    assert match[:8] in rate.source

    cpu4 = _study(
        tmp_path, synthetic_dir, resources_per_trial={"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 4}
    )
    rate, note = rate_from_mlflow(cpu4.workload(), uri)
    assert rate is None and "no earlier run of this model and layout" in note


def test_probe_on_cpu_gives_a_finite_rate(synthetic_dir, tmp_path):
    import torch

    from pisa.core.config import parse_config
    from pisa.training.probe import probe_rate

    cfg = parse_config(tiny_experiment(synthetic_dir, tmp_path))
    threads = torch.get_num_threads()
    result = probe_rate(cfg, warmup=1, steps=2)
    assert math.isfinite(result.images_per_sec) and result.images_per_sec > 0
    assert result.device == "cpu" and result.steps == 2 and result.threads == 1
    assert result.eval_image_s > 0 and result.val_images == 4  # the tiny config's val_limit
    assert torch.get_num_threads() == threads  # restored


# ---------------------------------------------------------------- the command


def test_cli_prints_the_plan(tmp_path, synthetic_dir):
    path = write_study(tmp_path, synthetic_dir, "cli-plan")
    cli = subprocess.run(
        PISA + ["study", "plan", str(path), "--gpus", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
    out = cli.stdout
    # 4 trials x 2 epochs of 8 images, 2 at a time on CPUs; ASHA (grace 1, factor 2): 4 + 2 trial-epochs
    assert "study cli-plan" in out and "trial-epochs" in out
    assert "2 trial(s), on 1 GPU(s) (--gpus)" in out and "8 images, 4 iterations per worker; 2 epochs" in out
    assert "unknown: no MLflow store" in out
    rows = {
        " ".join(line.split()[:2]): line.split()[-4:] for line in out.splitlines() if line.strip().startswith("ASHA")
    }
    # trial-epochs, epochs in a row (waves of 2), hours, wall: no rate, no hours
    assert rows["ASHA lower"] == ["6", "3", "?", "?"]  # 4 trials x 1 epoch + 2 x 1; waves 2 + 1
    assert rows["ASHA, upper"] == ["8", "4", "?", "?"]  # 4 x 2; 2 waves of 2 epochs
    assert "Ray" not in cli.stderr


def test_cli_bad_field_exits_2_in_one_line(tmp_path, synthetic_dir):
    space = {"model.isr_p.k": {"type": "uniform", "low": 0.0, "high": 3.0}}  # k must be > 0
    path = write_study(tmp_path, synthetic_dir, "bad-plan", search_space=space)
    cli = subprocess.run(
        PISA + ["study", "plan", str(path), "--gpus", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert cli.returncode == 2
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "search_space.model.isr_p.k: value 0.0" in lines[0]
    assert cli.stdout == ""


def test_study_start_prints_and_logs_the_plan(tmp_path, synthetic_dir, monkeypatch, capsys):
    from pisa import tracking
    from pisa.planning import cost_plan as plan_module
    from pisa.search.tuner import _print_start

    study = _study(tmp_path, synthetic_dir)
    uri = study.base_config.tracking.resolved_uri()
    parent = tracking.tracker(uri).start_run("tests", "study plan", tags={"pisa.kind": "study"})
    # an earlier trial of the same model: its rate prices this study
    experiment = tracking.tracker(uri).experiment_id("tests")
    _log_run(mlflow_client(uri), experiment, study.base_config.flat_params(), [4.0], start=1)
    monkeypatch.setattr(plan_module, "ray_cluster", lambda: CPUS)  # what Ray, started by then, would say
    _print_start(study, uri, parent)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[pisa] plan: "))
    assert "4 trials x 2 epochs, 2 at a time, 8 images/epoch" in line and "rate 4 img/s from run" in line
    artifacts = {a.path for a in mlflow_client(uri).list_artifacts(parent)}
    assert {"plan.txt", "plan.json"} <= artifacts
    logged = json.loads(Path(mlflow_client(uri).download_artifacts(parent, "plan.json", str(tmp_path))).read_text())
    assert logged["line"] == line.removeprefix("[pisa] ") and logged["fifo"]["trial_epochs"] == 8


def test_cli_gpu_mem_prices_the_packed_layout(tmp_path, synthetic_dir, capsys, no_ray):
    from pisa import cli

    # frozen BN, 8 x 2 given; 141 GiB cards at 3 GiB per image: 2 + 16 x 3 = 50 GiB <= 126.9, so 1 x 16
    path = write_study(
        tmp_path,
        synthetic_dir,
        "packed-plan",
        experiment={"model": {"norm": "frozen_bn"}},
        num_samples=8,
        max_concurrent_trials=1,
        resources_per_trial={"workers": 8, "gpus_per_worker": 1, "pack": "auto", "gpu_mem_per_image_gib": 3},
    )
    assert cli.main(["study", "plan", str(path), "--gpus", "8", "--gpu-mem", "141"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "per trial 1 worker(s) x 16 images = batch 16; 1 GPU(s) per worker; packed from 8 worker(s)" in out
    # 1 trial of 8 GPUs allowed at once: 8 trials of 1 GPU on the same 8 GPUs
    assert "at once 8 trial(s), on 8 GPU(s) (--gpus)" in out
    assert "8 images, 1 iterations per worker; 2 epochs" in out  # 8 images, 16 per step
    assert "(3 GiB/image from gpu_mem_per_image_gib, 2 GiB per worker, 127 of 141 GiB usable per worker)" in out
    assert cli.main(["study", "plan", str(path), "--gpu-mem", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpu-mem: 0.0 is not a GPU's memory in GiB"
