"""Faults survived by default, with real processes, on object storage: a SIGKILLed trial
process (where a 1-worker trial trains) costs one restart from the trial's last checkpoint;
a SIGKILLed driver costs a `pisa study resume`, which continues the study as it was started
(its `--set` overrides included) from its state in an S3 bucket (a real S3-compatible
server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_experiment
from services import start_s3, stop_group

from pisa import tracking
from pisa.core import storage

PISA = [sys.executable, "-m", "pisa.cli"]


def _wait(predicate, timeout: float, proc: subprocess.Popen, log: Path, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _children(uri: str, parent: str):
    return tracking.tracker(uri).children("tests", parent)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    server = start_s3(tmp_path)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    yield server
    stop_group(server.process)


def _checkpoint_epochs(study_dir: str, trial_id: str) -> list[int]:
    """The epochs of the checkpoints kept for trial `trial_id` (Tune names its folder after it)."""
    import pyarrow.fs as pafs

    fs, path = storage._fs(study_dir)
    epochs = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        parts = info.path.split("/")
        if info.type == pafs.FileType.Directory and parts[-1].startswith("checkpoint_") and trial_id in parts[-2]:
            with storage.local_copy(storage.join(study_dir, *parts[len(path.rstrip("/").split("/")) :])) as local:
                epochs.append(torch.load(local / "checkpoint.pt", weights_only=True)["epoch"])
    return sorted(epochs)


@pytest.mark.slow
def test_killed_worker_then_killed_driver_then_resume_with_overrides(synthetic_dir, tmp_path, s3):
    base = tiny_experiment(synthetic_dir, tmp_path, keep_checkpoints=1)
    base["storage_path"] = root = f"s3://{s3.bucket}/studies"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "from-file",
        "base": "base.yaml",
        "num_samples": 4,
        "max_concurrent_trials": 1,
        "search_space": {"model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0}},
        # one worker: the trial trains in its own process (the default), which is what a
        # cluster loses with a node; `pisa train`'s Ray Train worker restart is tested in test_train
        "resources_per_trial": {"workers": 1, "gpus_per_worker": 0},
        "scheduler": {"type": "asha"},
    }
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(spec))
    # the overrides the resume must keep; `epoch` (min) makes the best checkpoint the oldest one
    overrides = ["name=ovr", "num_samples=2", "scheduler.type=fifo", "metric=epoch", "mode=min"]
    pidfile = tmp_path / "worker.pid"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PISA_FAULTS": json.dumps({"stall_at": f"1:1:{pidfile}"}),  # epoch 2, iteration 2
        # the driver dies right after the restarted trial ends, before Tune saves its state
        "PISA_DRIVER_FAULTS": json.dumps({"kill_at": "trial_complete:1"}),
    }
    log = tmp_path / "run.log"
    # -v: the workers' own output (the fault injection's line) reaches the console only then
    cmd = PISA + ["study", "run", str(study_file), "-v"] + [x for o in overrides for x in ("--set", o)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    uri = base["tracking"]["uri"]
    state_file = storage.join(root, "ovr", "pisa_study.json")
    try:
        worker = int(
            _wait(
                lambda: pidfile.exists() and pidfile.read_text().strip(), 600, proc, log, "the worker to reach epoch 2"
            )
        )
        os.kill(worker, signal.SIGKILL)  # a worker lost mid-epoch (OOM killer, pre-empted node)
        parent = json.loads(storage.read_text(state_file))["parent_run_id"]
        assert proc.wait(timeout=600) == -signal.SIGKILL, log.read_text()[-4000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what the driver had started (its local Ray)
        except ProcessLookupError:
            pass
    assert "fault injection: worker" in log.read_text()
    assert "killing the driver at trial_complete" in log.read_text()
    first_done = [r for r in _children(uri, parent) if r.info.status == "FINISHED"]
    assert len(first_done) == 1  # the restarted trial had finished when the driver died

    assert not (tmp_path / "ray_results").exists()  # the study's state is only in the bucket
    resumed = subprocess.run(
        PISA + ["study", "resume", "ovr", "--storage-path", root],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming study ovr" in resumed.stdout and "from-file" not in resumed.stdout
    assert "does not exist on storage" not in resumed.stdout + resumed.stderr

    c = tracking.client(uri)
    assert c.get_run(parent).info.status == "FINISHED"
    runs = _children(uri, parent)
    assert len(runs) == 2 and len({r.data.tags["pisa.trial_id"] for r in runs}) == 2
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "bbox_mAP"))
        assert steps == [1, 2], (run.data.tags["pisa.trial_id"], steps)  # none lost, none repeated
    first = min(runs, key=lambda r: r.info.start_time)
    # keep_checkpoints=1: the best (epoch 1 by `epoch`, min) and the latest (epoch 2) are kept.
    # A restart may leave the pre-failure copy of epoch 1 too (the checkpoints of the attempt
    # before a restart are not pruned): a set, not a list, is compared.
    kept = _checkpoint_epochs(storage.join(root, "ovr"), first.data.tags["pisa.trial_id"])
    assert set(kept) == {0, 1}, kept
    art = c.download_artifacts(first.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path))
    assert torch.load(art, weights_only=True)["epoch"] == 0  # the best epoch, not the last
