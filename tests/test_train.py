"""Ray Train engine end to end on CPU: 2 gloo workers, COCO metrics, MLflow, resume, faults."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_experiment

from pisa import tracking
from pisa.core.config import parse_config
from pisa.core.errors import TrackingError
from pisa.training.train import TrainOutcome, run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


def with_loader_workers(data: dict, num_workers: int = 2) -> dict:
    """The config with DataLoader worker processes, as every paper config has."""
    data["data"]["num_workers"] = num_workers
    return data


@pytest.fixture(scope="module")
def full_run(ray_local, synthetic_dir, work) -> tuple[TrainOutcome, dict]:
    cfg = parse_config(with_loader_workers(tiny_experiment(synthetic_dir, work)))
    outcome = run_training(cfg, run_name="full")
    return outcome, cfg


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key)]


def test_two_workers_train_and_report_coco_metrics(full_run):
    outcome, cfg = full_run
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.metrics["epoch"] == 2
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_AR_100", "train_loss", "train_loss_carl", "lr", "images_per_sec"):
        assert key in outcome.metrics
    assert 0.0 <= outcome.metrics["bbox_mAP"] <= 1.0
    assert outcome.metrics["train_loss"] > 0
    assert Path(outcome.checkpoint_dir, "checkpoint.pt").exists()


def test_mlflow_run_has_params_metrics_and_artifacts(full_run):
    outcome, cfg = full_run
    uri = cfg.tracking.resolved_uri()
    c = tracking.client(uri)
    run = c.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.isr_p.k"] == "2.0" and params["model.carl.bias"] == "0.2"
    assert params["train.workers"] == "2" and params["data.num_classes"] == "3"
    assert [s for s, _ in _history(uri, outcome.run_id, "bbox_mAP")] == [1, 2]
    assert len(_history(uri, outcome.run_id, "train_loss")) == 2
    artifacts = {a.path for a in c.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "checkpoint", "plots"} <= artifacts
    assert {a.path for a in c.list_artifacts(outcome.run_id, "checkpoint")} == {
        "checkpoint/checkpoint.pt",
        "checkpoint/config.json",
    }


def test_resume_from_epoch_one_matches_uninterrupted(full_run, synthetic_dir, work):
    outcome, cfg = full_run
    epoch1 = sorted(Path(outcome.checkpoint_dir).parent.glob("checkpoint_*"))[0]
    import torch

    assert torch.load(epoch1 / "checkpoint.pt", weights_only=True)["epoch"] == 0
    # 2 Ray workers x 2 loader workers: epoch 2's data order and augmentation draws must be
    # those of the uninterrupted run, not a replay of epoch 1's
    resumed = run_training(
        parse_config(with_loader_workers(tiny_experiment(synthetic_dir, work))),
        run_name="resumed",
        resume_from=str(epoch1),
    )
    assert resumed.status == "FINISHED", resumed.error
    assert resumed.metrics["epoch"] == 2
    for key in ("train_loss", "train_loss_classifier", "bbox_mAP", "bbox_AR_100"):
        assert resumed.metrics[key] == pytest.approx(outcome.metrics[key], rel=1e-6, abs=1e-9), key


def test_pisa_train_runs_the_gpu_code_path_on_cpu(ray_local, synthetic_dir, work, capsys):
    """`pisa train` with 2 workers, AMP (bfloat16 on CPU), channels_last and loader workers:
    the switches a GPU run turns on by default, through the same engine code."""
    import json

    import yaml

    from pisa.cli import main

    config = work / "gpu_path.yaml"
    config.write_text(yaml.safe_dump(tiny_experiment(synthetic_dir, work, epochs=1)))
    code = main(
        [
            "train",
            str(config),
            "--run-name",
            "gpu-path",
            "--set",
            "train.amp=true",
            "--set",
            "train.channels_last=true",
            "--set",
            "data.num_workers=2",
        ]
    )
    captured = capsys.readouterr()
    out, console = captured.out, captured.out + captured.err
    assert code == 0, out[-3000:]
    summary = json.loads(out[out.rindex('{\n  "run_id"') :])
    assert summary["status"] == "FINISHED" and summary["metrics"]["epoch"] == 1
    assert summary["metrics"]["train_loss"] > 0
    # the console: the workers' progress lines, without Ray Train's INFO lines (its process
    # group set-up comes before the first iteration; each report is a multi-kilobyte dict)
    assert "[pisa] epoch 1/1 iter 1/2" in console, console[-3000:]
    assert "Setting up process group" not in console, console[-3000:]
    assert "Reporting training result" not in console, console[-3000:]
    params = tracking.client(f"sqlite:///{work / 'mlflow.db'}").get_run(summary["run_id"]).data.params
    assert (params["train.amp"], params["train.channels_last"], params["data.num_workers"]) == ("True", "True", "2")


def test_killed_worker_is_restarted_from_last_checkpoint(ray_local, synthetic_dir, work, tmp_path):
    cfg = parse_config(tiny_experiment(synthetic_dir, work, max_failures=1))
    marker = tmp_path / "killed"
    outcome = run_training(cfg, run_name="killed", faults={"kill_at": f"1:1:{marker}"})
    assert marker.exists(), "the fault was not injected"
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.metrics["epoch"] == 2
    uri = cfg.tracking.resolved_uri()
    # epoch 1 was reported once before the kill; epoch 2 after the restart
    assert [s for s, _ in _history(uri, outcome.run_id, "bbox_mAP")] == [1, 2]


def test_non_finite_loss_stops_with_clear_error(ray_local, synthetic_dir, work):
    cfg = parse_config(tiny_experiment(synthetic_dir, work, epochs=1))
    nan_log = work / "nan.log"
    outcome = run_training(cfg, run_name="nan", faults={"nan_at": 1, "nan_log": str(nan_log)})
    assert outcome.status == "FAILED"
    assert "non-finite loss at epoch 1 iteration 2" in outcome.error
    # both workers hit it once: no restart from a checkpoint (train.max_failures, 3 by
    # default) repeats a divergence that would only come back
    assert sorted(nan_log.read_text().split("\n")[:-1]) == ["rank 0", "rank 1"]
    run = tracking.client(cfg.tracking.resolved_uri()).get_run(outcome.run_id)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["pisa.error"]


def test_unreachable_tracking_server_fails_fast(synthetic_dir, work, tmp_path):
    data = tiny_experiment(synthetic_dir, work)
    data["tracking"]["uri"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    data["storage_path"] = str(tmp_path / "ray_results")  # this test's own: nothing may appear
    cfg = parse_config(data)
    with pytest.raises(TrackingError, match="not reachable"):
        run_training(cfg)
    assert not Path(cfg.storage_path).exists()  # failed before Ray Train wrote anything


def test_pisa_train_stopped_by_sigterm_leaves_its_run_killed_not_running(synthetic_dir, tmp_path):
    """SIGTERM (Kubernetes, Slurm, `timeout`) once the workers train: Ray Train's run is
    aborted as on Ctrl-C, the MLflow run is KILLED and marked interrupted, exit 143; and
    no Ray traceback reaches the console on the way."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    data = tiny_experiment(synthetic_dir, tmp_path, workers=1, epochs=3)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(data))
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pisa.cli", "train", "train.yaml", "--run-name", "stopped"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while "epoch 1/3" not in log.read_text():  # a worker's first progress line
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "Traceback" not in text and "TrainController" not in text, text[-3000:]
    (run,) = tracking.tracker(data["tracking"]["uri"]).find_runs("tests", "")
    assert run.info.status == "KILLED" and run.data.tags["pisa.status"] == "interrupted"
