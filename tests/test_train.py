"""Ray Train engine end to end on CPU: 2 gloo workers on the GPU code path, COCO metrics,
MLflow, resume, a killed worker, a NaN, SIGTERM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import mlflow_client, tiny_experiment

from pisa import tracking
from pisa.core.config import parse_config
from pisa.core.errors import TrackingError
from pisa.training.train import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@dataclass
class FullRun:
    """The uninterrupted `pisa train` every other test here compares with."""

    summary: dict
    console: str
    config: dict
    storage: Path

    @property
    def uri(self) -> str:
        return self.config["tracking"]["uri"]

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.storage.glob("*/checkpoint_*") if p.is_dir())


# The switches a GPU run turns on by default (AMP, bfloat16 on CPU; channels_last; loader
# worker processes, as every paper config has), through the same engine code, on 2 workers.
GPU_PATH = {"amp": True, "channels_last": True}


def gpu_path_experiment(synthetic_dir: Path, work: Path, **train) -> dict:
    data = tiny_experiment(synthetic_dir, work, epochs=3, keep_checkpoints=3, **GPU_PATH, **train)
    data["data"]["num_workers"] = 2
    return data


@pytest.fixture(scope="module")
def full_run(ray_local, synthetic_dir, work) -> FullRun:
    """`pisa train` of 3 epochs on the GPU code path, its console captured."""
    import contextlib
    import io
    import json

    import yaml

    from pisa.cli import main

    data = gpu_path_experiment(synthetic_dir, work)
    data["storage_path"] = str(work / "full")
    config = work / "full.yaml"
    config.write_text(yaml.safe_dump(data))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(config), "--run-name", "full"])
    text = out.getvalue()
    assert code == 0, text[-3000:] + err.getvalue()[-3000:]
    summary = json.loads(text[text.rindex('{\n  "run_id"') :])
    return FullRun(summary, text + err.getvalue(), data, Path(data["storage_path"]))


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow_client(uri).get_metric_history(run_id, key)]


def test_two_workers_train_on_the_gpu_code_path_and_report_coco_metrics(full_run):
    summary = full_run.summary
    assert summary["status"] == "FINISHED", summary["error"]
    metrics = summary["metrics"]
    assert metrics["epoch"] == 3
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_AR_100", "train_loss", "train_loss_carl", "lr", "images_per_sec"):
        assert key in metrics
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0
    assert metrics["train_loss"] > 0
    assert len(full_run.checkpoints()) == 3 and all((c / "checkpoint.pt").exists() for c in full_run.checkpoints())
    # the console: the workers' progress lines, without Ray Train's INFO lines (its process
    # group set-up comes before the first iteration; each report is a multi-kilobyte dict)
    console = full_run.console
    assert "[pisa] epoch 1/3 iter 1/2" in console, console[-3000:]
    assert "Setting up process group" not in console, console[-3000:]
    assert "Reporting training result" not in console, console[-3000:]


def test_mlflow_run_has_params_metrics_and_artifacts(full_run):
    uri, run_id = full_run.uri, full_run.summary["run_id"]
    c = mlflow_client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.isr_p.k"] == "2.0" and params["model.carl.bias"] == "0.2"
    assert params["train.workers"] == "2" and params["data.num_classes"] == "3"
    assert (params["train.amp"], params["train.channels_last"], params["data.num_workers"]) == ("True", "True", "2")
    assert [s for s, _ in _history(uri, run_id, "bbox_mAP")] == [1, 2, 3]
    assert len(_history(uri, run_id, "train_loss")) == 3
    artifacts = {a.path for a in c.list_artifacts(run_id)}
    assert {"config.yaml", "checkpoint", "plots"} <= artifacts
    assert {a.path for a in c.list_artifacts(run_id, "checkpoint")} == {
        "checkpoint/checkpoint.pt",
        "checkpoint/config.json",
    }


def test_resumed_and_killed_worker_continue_exactly_as_uninterrupted(
    full_run, synthetic_dir, work, tmp_path, monkeypatch
):
    """`pisa train --resume` from epoch 1's checkpoint, named relative to the user's directory
    (the Ray Train workers run in another one); in epoch 3 a worker is killed and Ray
    Train restarts the group, which continues from this run's own epoch 2 (not from the
    resumed-from checkpoint). With 2 Ray workers x 2 loader workers, the data order and the
    augmentation draws of epochs 2 and 3 must be the uninterrupted run's, and each epoch is
    reported once."""
    import torch

    epoch1 = full_run.checkpoints()[0]
    assert torch.load(epoch1 / "checkpoint.pt", weights_only=True)["epoch"] == 0
    marker = tmp_path / "killed"
    cfg = parse_config(gpu_path_experiment(synthetic_dir, work, max_failures=1))
    monkeypatch.chdir(epoch1.parent)
    resumed = run_training(cfg, run_name="resumed", resume_from=epoch1.name, faults={"kill_at": f"2:1:{marker}"})
    assert marker.exists(), "the fault was not injected"
    assert resumed.status == "FINISHED", resumed.error
    assert resumed.metrics["epoch"] == 3
    for key in ("train_loss", "train_loss_classifier", "bbox_mAP", "bbox_AR_100"):
        expected = full_run.summary["metrics"][key]
        assert resumed.metrics[key] == pytest.approx(expected, rel=1e-6, abs=1e-9), key
    # epoch 2 reported once before the kill, epoch 3 after the restart: a restart from the
    # --resume checkpoint (epoch 1) instead of the run's own epoch 2 would train and report
    # epoch 2 a second time (MLflow keeps every logged value, so the history would be [2, 2, 3])
    assert [s for s, _ in _history(cfg.tracking.resolved_uri(), resumed.run_id, "bbox_mAP")] == [2, 3]


def test_non_finite_loss_stops_with_clear_error(ray_local, synthetic_dir, work):
    cfg = parse_config(tiny_experiment(synthetic_dir, work, epochs=1))
    nan_log = work / "nan.log"
    outcome = run_training(cfg, run_name="nan", faults={"nan_at": 1, "nan_log": str(nan_log)})
    assert outcome.status == "FAILED"
    assert "non-finite loss at epoch 1 iteration 2" in outcome.error
    # both workers hit it once: no restart from a checkpoint (train.max_failures, 3 by
    # default) repeats a divergence that would only come back
    assert sorted(nan_log.read_text().split("\n")[:-1]) == ["rank 0", "rank 1"]
    run = mlflow_client(cfg.tracking.resolved_uri()).get_run(outcome.run_id)
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
