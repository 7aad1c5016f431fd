"""Nothing lost, whatever dies and whenever. One tiny study, on object storage (a real
S3-compatible server) and a real `mlflow server`, started with `--set` overrides; one
`pisa` process after another, each ended at a known point:

1. a trial process SIGKILLed mid-epoch (Tune restarts it from its checkpoint), then the
   driver SIGKILLed right after that trial ended, before Tune saved its state;
2. the driver SIGKILLed while a checkpoint is taken in;
3. the driver SIGKILLed right after an MLflow write of an epoch's results;
4. the driver SIGKILLed mid-epoch, then the checkpoint Tune's snapshot names deleted (as
   checkpoint retention did in the crash this reproduces);
5. SIGTERM (Kubernetes, Slurm, `timeout`) to the driver mid-epoch: exit 143, nothing left
   RUNNING, the study listed as interrupted;
6. the MLflow server stopped while an epoch's results are written, started again on the
   same port 10 s later; the study ends.

Each leg after the first is a `pisa study resume`, which keeps the overrides. Every leg
joins one running Ray cluster (`--address`), as on a cluster whose driver dies: Ray ends a
dead driver's trials, and no leg pays for starting Ray. The kills happen at fixed points
(crash hooks, or a trial paused at a known iteration), not after sleeps. At the end:
exactly the study's trials, one MLflow run each, every epoch of each logged once, the
study's run FINISHED, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
import yaml
from helpers import mlflow_client, tiny_experiment
from services import ensure_ray_token, start_mlflow_server, start_ray_cluster, start_s3, stop_group, stop_ray_cluster

from pisa import tracking
from pisa.core import storage

PISA = [sys.executable, "-m", "pisa.cli"]
NAME = "crashes"
TRIALS = 3
EPOCHS = 2
# what every resume must keep: the name, the number of trials, FIFO, and `epoch` (min) as
# the metric, which makes a trial's best checkpoint its oldest one
OVERRIDES = [f"name={NAME}", f"num_samples={TRIALS}", "scheduler.type=fifo", "metric=epoch", "mode=min"]

pytestmark = pytest.mark.slow


def _study(tmp_path: Path, synthetic_dir: Path, uri: str, root: str) -> Path:
    base = tiny_experiment(synthetic_dir, tmp_path, keep_checkpoints=1, epochs=EPOCHS)
    base["tracking"]["uri"] = uri
    base["storage_path"] = root
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "from-file",
        "base": "base.yaml",
        "num_samples": 4,
        "max_concurrent_trials": 1,
        "search_space": {"model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0}},
        # one worker: the trial trains in its own process (the default), what a cluster
        # loses with a node; `pisa train`'s Ray Train worker restart is tested in test_train
        "resources_per_trial": {"workers": 1, "gpus_per_worker": 0},
        "scheduler": {"type": "asha"},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Leg:
    """One `pisa` process of the study, in its own process group (with the Ray it starts)."""

    def __init__(self, tmp_path: Path, args: list[str], index: int, **faults: str):
        self.log = tmp_path / f"leg{index}.log"
        # MLflow's client retries an unreachable store after 1, 2, 4, 8 ... s (factor 1; its
        # default 2 waits twice as long): leg 6's store comes back after 10 s
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        if "kill_at" in faults:
            env["PISA_DRIVER_FAULTS"] = json.dumps({"kill_at": faults["kill_at"]})
        if "stall_at" in faults:
            env["PISA_FAULTS"] = json.dumps({"stall_at": faults["stall_at"]})
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                PISA + args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 420) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log.name} did not end in {timeout} s:\n{self.output()[-4000:]}")

    def wait_for(self, path: Path, timeout: float = 420) -> int:
        """The pid a paused trial wrote to `path`."""
        deadline = time.time() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log.name} ended ({self.proc.returncode}) first:\n{self.output()[-4000:]}")
            if time.time() > deadline:
                self.kill()
                pytest.fail(f"{self.log.name}: no {path.name} in {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        return int(path.read_text().strip())

    def kill(self) -> None:
        """What a crashed driver leaves behind goes too: its local Ray and trial processes."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)


def _crashed(leg: Leg, point: str) -> None:
    code = leg.wait()
    leg.kill()
    assert code == -signal.SIGKILL, f"{leg.log.name} exited {code}:\n{leg.output()[-4000:]}"
    assert f"killing the driver at {point}" in leg.output()


def _runs(uri: str, parent: str):
    return tracking.tracker(uri).children("tests", parent)


def _trial_dirs(study_dir: str) -> dict[str, str]:
    """Tune's directory of each trial (named after its id) -> its path in the bucket."""
    fs, path = storage._fs(study_dir)
    return {
        info.base_name: info.path
        for info in fs.get_file_info(pafs.FileSelector(path))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("run_trial_")
    }


def _delete_checkpoints_of_running_trial(study_dir: str, uri: str, parent: str) -> None:
    running = [r for r in _runs(uri, parent) if r.info.status == "RUNNING"]
    assert len(running) == 1, [(r.data.tags.get("pisa.trial_id"), r.info.status) for r in running]
    trial_id = running[0].data.tags["pisa.trial_id"]
    fs, _ = storage._fs(study_dir)
    (trial_dir,) = [p for name, p in _trial_dirs(study_dir).items() if trial_id in name]
    checkpoints = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(trial_dir))
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    ]
    assert checkpoints, f"no checkpoint in {trial_dir}"
    for path in checkpoints:
        fs.delete_dir(path)


def _checkpoint_epochs(study_dir: str, trial_id: str) -> list[int]:
    """The epochs of the checkpoints kept for trial `trial_id`."""
    fs, _ = storage._fs(study_dir)
    (trial_dir,) = [p for name, p in _trial_dirs(study_dir).items() if trial_id in name]
    epochs = []
    for info in fs.get_file_info(pafs.FileSelector(trial_dir)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            with storage.local_copy(storage.join(study_dir, trial_dir.rsplit("/", 1)[-1], info.base_name)) as local:
                epochs.append(torch.load(local / "checkpoint.pt", weights_only=True)["epoch"])
    return sorted(epochs)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    server = start_s3(tmp_path)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    yield server
    stop_group(server.process)


@pytest.fixture
def ray_head(tmp_path):
    """One Ray node (2 CPUs) for every leg, with token auth as `ray start` turns it on."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ensure_ray_token(env)
    cluster = start_ray_cluster(tmp_path, env, None, nodes=1, cpus_per_node=2)
    yield cluster.gcs_address
    stop_ray_cluster(cluster)


def test_study_survives_a_crash_at_every_point(synthetic_dir, tmp_path, s3, ray_head):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = start_mlflow_server(server_dir)
    port = int(server.uri.rsplit(":", 1)[1])
    uri = server.uri
    root = f"s3://{s3.bucket}/studies"
    study_dir = storage.join(root, NAME)
    path = _study(tmp_path, synthetic_dir, uri, root)
    resume = ["study", "resume", NAME, "--storage-path", root, "--address", ray_head]
    try:
        # 1. a trial process lost mid-epoch (OOM killer, a pre-empted node): Tune restarts it
        # from its checkpoint; the driver dies right after that trial ends
        worker_pid = tmp_path / "worker.pid"
        run = ["study", "run", str(path), "-v", "--address", ray_head] + [x for o in OVERRIDES for x in ("--set", o)]
        leg = Leg(tmp_path, run, 1, stall_at=f"1:1:{worker_pid}", kill_at="trial_complete:1")
        os.kill(leg.wait_for(worker_pid), signal.SIGKILL)
        _crashed(leg, "trial_complete")
        assert "fault injection: worker" in leg.output()
        assert not (tmp_path / "ray_results").exists()  # the study's state is only in the bucket
        parent = json.loads(storage.read_text(storage.join(study_dir, "pisa_study.json")))["parent_run_id"]
        (first,) = _runs(uri, parent)
        assert first.info.status == "FINISHED"

        # 2. while a checkpoint is taken in (the first trial is not trained again)
        leg = Leg(tmp_path, resume, 2, kill_at="checkpoint:1")
        _crashed(leg, "checkpoint")
        assert "resuming study crashes" in leg.output() and "from-file" not in leg.output()

        # 3. right after an MLflow write of an epoch's results
        leg = Leg(tmp_path, resume, 3, kill_at="mlflow_write:1")
        _crashed(leg, "mlflow_write")

        # 4. mid-epoch; then the checkpoint the snapshot names is lost
        pause = tmp_path / "pause-kill.pid"
        leg = Leg(tmp_path, resume, 4, stall_at=f"1:1:{pause}")
        leg.wait_for(pause)
        os.kill(leg.proc.pid, signal.SIGKILL)
        leg.kill()
        _delete_checkpoints_of_running_trial(study_dir, uri, parent)

        # 5. SIGTERM mid-epoch: handled as Ctrl-C
        pause = tmp_path / "pause-term.pid"
        leg = Leg(tmp_path, resume, 5, stall_at=f"1:1:{pause}")
        leg.wait_for(pause)
        os.kill(leg.proc.pid, signal.SIGTERM)  # to the driver alone, as Kubernetes does
        code = leg.wait()
        leg.kill()
        out = leg.output()
        assert code == 143, out[-4000:]
        assert "is gone; continuing from scratch" in out, out[-4000:]  # the repair of leg 4's loss
        assert all(r.info.status in ("FINISHED", "KILLED") for r in _runs(uri, parent))
        assert any(r.data.tags["pisa.status"] == "interrupted" for r in _runs(uri, parent))
        study_run = mlflow_client(uri).get_run(parent)
        assert study_run.info.status == "KILLED" and study_run.data.tags["pisa.status"] == "interrupted"
        listed = subprocess.run(
            PISA + ["study", "list", "--storage-path", root], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert f"{NAME} " in listed.stdout and "interrupted" in listed.stdout, listed.stdout + listed.stderr

        # 6. the MLflow server goes away while an epoch's results are written, and comes back
        pause = tmp_path / "pause-store.pid"
        leg = Leg(tmp_path, resume, 6, stall_at=f"1:1:{pause}")
        leg.wait_for(pause)
        server.stop()
        Path(str(pause) + ".go").touch()  # the epoch ends and its results wait for the store
        time.sleep(10)
        server = start_mlflow_server(server_dir, port=port)
        code = leg.wait()
        assert code == 0, leg.output()[-4000:]
        _check_everything_logged_once(uri, parent)
        _check_best_checkpoint(uri, study_dir, first, tmp_path)
    finally:
        server.stop()


def _check_everything_logged_once(uri: str, parent: str) -> None:
    c = mlflow_client(uri)
    assert c.get_run(parent).info.status == "FINISHED"
    runs = _runs(uri, parent)
    trial_ids = [r.data.tags["pisa.trial_id"] for r in runs]
    assert len(runs) == TRIALS and len(set(trial_ids)) == TRIALS, trial_ids
    for run in runs:
        assert run.info.status == "FINISHED", (run.data.tags.get("pisa.trial_id"), run.data.tags)
        assert run.data.tags["pisa.status"] == "finished"
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "bbox_mAP"))
        assert steps == list(range(1, EPOCHS + 1)), (run.data.tags["pisa.trial_id"], steps)  # none lost or repeated


def _check_best_checkpoint(uri: str, study_dir: str, first, tmp_path: Path) -> None:
    """keep_checkpoints=1 keeps the best (epoch 1 by `epoch`, min) and the latest (epoch 2);
    MLflow gets the best. A restart may leave the pre-failure copy of epoch 1 too (Tune does
    not prune an attempt's checkpoints after a restart): a set, not a list, is compared."""
    kept = _checkpoint_epochs(study_dir, first.data.tags["pisa.trial_id"])
    assert set(kept) == {0, 1}, kept
    art = mlflow_client(uri).download_artifacts(first.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path))
    assert torch.load(art, weights_only=True)["epoch"] == 0  # the best epoch, not the last
