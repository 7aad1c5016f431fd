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
study's run FINISHED, exit 0.

The study's Optuna record is on PostgreSQL (the README's recommendation; the password from
libpq's environment, PGPASSWORD, never in the study file), and after the last leg it is what
Tune did: every trial Tune ran is in Optuna once, in the state Tune ended it with (the study is
FIFO, so every trial runs its epochs and ends COMPLETE: `stopped_early` would be PRUNED), with
each epoch's value once as an intermediate value, none left RUNNING or FAIL, and one database
row per trial and epoch. Leg 1's driver dies right after a trial's end was handled, before
Tune saved its state: the resume reports that end again and must leave the Optuna trial as it
was told; the other legs die mid-trial."""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import optuna
import pyarrow.fs as pafs
import pytest
import torch
import yaml
from helpers import mlflow_client, tiny_experiment
from optuna.trial import TrialState
from services import (
    MlflowServer,
    RayCluster,
    S3Server,
    ensure_ray_token,
    s3_env,
    start_mlflow_server,
    start_ray_cluster,
    start_s3,
    stop_groups,
    stop_ray_cluster,
)

from pisa import tracking
from pisa.core import storage
from pisa.core.checkpoint import CHECKPOINT_FILE
from pisa.training.ray_runtime import free_port

PISA = [sys.executable, "-m", "pisa.cli"]
NAME = "crashes"
TRIALS = 3
EPOCHS = 2
SEARCHED = "model.isr_p.k"
METRIC = "epoch"  # the study's metric (below): what Optuna gets per epoch
# what every resume must keep: the name, the number of trials, FIFO, and `epoch` (min) as
# the metric, which makes a trial's best checkpoint its oldest one
OVERRIDES = [f"name={NAME}", f"num_samples={TRIALS}", "scheduler.type=fifo", f"metric={METRIC}", "mode=min"]

pytestmark = pytest.mark.slow


def _study(tmp_path: Path, synthetic_dir: Path, uri: str, root: str, optuna_url: str) -> Path:
    base = tiny_experiment(synthetic_dir, tmp_path, keep_checkpoints=1, epochs=EPOCHS)
    base["tracking"]["uri"] = uri
    base["storage_path"] = root
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "from-file",
        "base": "base.yaml",
        "num_samples": 4,
        "max_concurrent_trials": 1,
        "search_space": {SEARCHED: {"type": "uniform", "low": 0.5, "high": 3.0}},
        # one worker: the trial trains in its own process (the default), what a cluster
        # loses with a node; `pisa train`'s Ray Train worker restart is tested in test_train
        "resources_per_trial": {"workers": 1, "gpus_per_worker": 0},
        "scheduler": {"type": "asha"},
        "optuna_storage": optuna_url,  # no password in it: PGPASSWORD
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
        # Tune saves the study's trials at most every 10 s by default ("auto"): a trial started
        # less than that before the driver dies is not in the snapshot a resume restores, and
        # starts again as a new trial (its first run is deleted at the study's end, its Optuna
        # trial told FAIL). Legs 2-4 kill the driver a few seconds into each resume, about as
        # soon as the next trial has started: whether it was saved then depended on how fast
        # the machine trained. A snapshot at most every second saves every started trial
        # before its first epoch ends (a trial process takes longer than that to start).
        env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
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
            with fs.open_input_file(f"{info.path}/{CHECKPOINT_FILE}") as f:
                epochs.append(_pickled_state(f)["epoch"])
    return sorted(epochs)


class _Stub:
    """Whatever a checkpoint's pickle builds besides plain data (its tensors, above all)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in ("builtins", "collections"):  # dicts, OrderedDicts (a state dict), lists
            return getattr(importlib.import_module(module), name)
        return _Stub

    def persistent_load(self, pid):
        return None  # a tensor's storage: a record of the zip, not read


def _pickled_state(f) -> dict:
    """A `checkpoint.pt`'s plain values (epoch, counters, metrics) from its pickle alone, read
    at random from the open file `f`: not its tensors (the weights and optimizer state, over a
    hundred MB a checkpoint, which the S3 server took over half a minute to serve)."""
    with zipfile.ZipFile(f) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return _StateUnpickler(io.BytesIO(archive.read(name))).load()


@dataclass
class Services:
    s3: S3Server
    ray_address: str
    mlflow: MlflowServer


@pytest.fixture
def services(tmp_path, monkeypatch):
    """S3 (moto), one Ray node (2 CPUs, with token auth as `ray start` turns it on) and an
    `mlflow server`, started side by side: each start waits on its own process alone, and the
    node needs no more of S3 than its address, which is chosen first."""
    port = free_port()
    for key, value in s3_env(f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(key, value)  # every leg's, and the Ray node's (its trials write to S3)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    (tmp_path / "server").mkdir()

    def ray_node() -> RayCluster:
        ensure_ray_token(env)
        return start_ray_cluster(tmp_path, env, None, nodes=1, cpus_per_node=2)

    with ThreadPoolExecutor(3) as pool:
        s3 = pool.submit(start_s3, tmp_path, port=port)
        ray = pool.submit(ray_node)
        mlflow = pool.submit(start_mlflow_server, tmp_path / "server")
    started: Services | None = None
    try:
        started = Services(s3.result(), ray.result().gcs_address, mlflow.result())
        yield started  # a test that starts the MLflow server again puts the new one here
    finally:  # whatever runs, side by side
        if ray.exception() is None:
            stop_ray_cluster(ray.result())
        running = [f.result() for f in (s3, mlflow) if f.exception() is None]
        if started is not None:
            running.append(started.mlflow)
        stop_groups([server.process for server in running])


@pytest.fixture
def optuna_db(postgres_server, monkeypatch):
    """A database of its own on the session's PostgreSQL server: the Optuna storage URL, its
    password in the environment every leg inherits."""
    database = postgres_server.create_database("optuna_crashes")
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    pg = postgres_server
    return f"postgresql+psycopg://{pg.user}@{pg.host}:{pg.port}/{database}", database


def test_study_survives_a_crash_at_every_point(synthetic_dir, tmp_path, services, optuna_db, postgres_server):
    optuna_url, database = optuna_db
    s3, ray_head, server = services.s3, services.ray_address, services.mlflow
    server_dir = server.work
    port = int(server.uri.rsplit(":", 1)[1])
    uri = server.uri
    root = f"s3://{s3.bucket}/studies"
    study_dir = storage.join(root, NAME)
    path = _study(tmp_path, synthetic_dir, uri, root, optuna_url)
    resume = ["study", "resume", NAME, "--storage-path", root, "--address", ray_head]
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
    server = services.mlflow = start_mlflow_server(server_dir, port=port)
    code = leg.wait()
    assert code == 0, leg.output()[-4000:]
    _check_everything_logged_once(uri, parent)
    _check_best_checkpoint(uri, study_dir, first, tmp_path)
    _check_optuna_record(uri, parent, optuna_url, postgres_server, database)


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


def _check_optuna_record(uri: str, parent: str, url: str, postgres_server, database: str) -> None:
    """The Optuna study on PostgreSQL against what Tune ran (MLflow's runs): each point once,
    COMPLETE (finished) or PRUNED (stopped early) as Tune ended it, the study metric's
    per-epoch history as its intermediate values; one row per trial and epoch in the database."""
    client = mlflow_client(uri)
    ended = {}  # by point: (Optuna's state as Tune ended the trial, the per-epoch values)
    for run in _runs(uri, parent):
        status = run.data.tags["pisa.status"]
        assert status in ("finished", "stopped_early"), status
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, METRIC)}
        assert sorted(history) == list(range(1, EPOCHS + 1)), history
        point = round(float(run.data.params[SEARCHED]), 9)
        ended[point] = (TrialState.COMPLETE if status == "finished" else TrialState.PRUNED, history)
    assert len(ended) == TRIALS, ended
    stored = {}
    for trial in optuna.load_study(study_name=NAME, storage=url).trials:
        point = round(float(trial.params[SEARCHED]), 9)
        assert point not in stored, f"one point told to Optuna twice: {point}"
        stored[point] = (trial.state, trial.intermediate_values)
    assert stored == ended, json.dumps({"optuna": str(stored), "tune": str(ended)})
    rows = postgres_server.query(
        "SELECT trial_id, step, count(*) FROM trial_intermediate_values GROUP BY trial_id, step", (), database
    )
    assert len(rows) == TRIALS * EPOCHS and all(n == 1 for _, _, n in rows), rows
