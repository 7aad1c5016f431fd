"""Nothing lost, whatever dies and whenever: one tiny study, its driver SIGKILLed at each
known point in turn (a crash point hook, or a trial paused at a known iteration), each
time continued with `pisa study resume`; the last leg also loses its MLflow server for a
while. At the end: exactly the study's trials, one MLflow run each, every epoch of each
logged once, the study's run FINISHED, exit 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import tiny_experiment
from services import start_mlflow_server

from pisa import tracking

PISA = [sys.executable, "-m", "pisa.cli"]
NAME = "crashes"
TRIALS = 3
EPOCHS = 2

pytestmark = pytest.mark.slow


def _study(tmp_path: Path, synthetic_dir: Path, uri: str) -> Path:
    base = tiny_experiment(synthetic_dir, tmp_path, keep_checkpoints=1, epochs=EPOCHS)
    base["tracking"]["uri"] = uri
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": NAME,
        "base": "base.yaml",
        "num_samples": TRIALS,
        "max_concurrent_trials": 1,
        "search_space": {"model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0}},
        "resources_per_trial": {"workers": 1, "gpus_per_worker": 0},
        "scheduler": {"type": "fifo"},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Leg:
    """One `pisa` process of the study, in its own process group (with the Ray it starts)."""

    def __init__(self, tmp_path: Path, args: list[str], index: int, **faults: str):
        self.log = tmp_path / f"leg{index}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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

    def wait_for(self, path: Path, timeout: float = 420) -> None:
        deadline = time.time() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log.name} ended ({self.proc.returncode}) first:\n{self.output()[-4000:]}")
            if time.time() > deadline:
                self.kill()
                pytest.fail(f"{self.log.name}: no {path.name} in {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.5)

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


def _running_trial_dir(study_dir: Path, uri: str, parent: str) -> Path:
    running = [r for r in tracking.tracker(uri).children("tests", parent) if r.info.status == "RUNNING"]
    assert len(running) == 1, [(r.data.tags.get("pisa.trial_id"), r.info.status) for r in running]
    trial_id = running[0].data.tags["pisa.trial_id"]
    (found,) = [d for d in study_dir.iterdir() if d.is_dir() and trial_id in d.name and d.name != "trials"]
    return found


def test_study_survives_a_crash_at_every_point(synthetic_dir, tmp_path):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = start_mlflow_server(server_dir)
    port = int(server.uri.rsplit(":", 1)[1])
    uri = server.uri
    path = _study(tmp_path, synthetic_dir, uri)
    study_dir = tmp_path / "ray_results" / NAME
    resume = ["study", "resume", NAME]
    try:
        # 1. between the MLflow write of trial 1's last epoch and the trial's end
        leg = Leg(tmp_path, ["study", "run", str(path), "-v"], 1, kill_at="mlflow_write:2")
        _crashed(leg, "mlflow_write")
        parent = json.loads((study_dir / "pisa_study.json").read_text())["parent_run_id"]

        # 2. right after a trial ended (its run FINISHED; Tune's snapshot still says running)
        leg = Leg(tmp_path, resume, 2, kill_at="trial_complete:1")
        _crashed(leg, "trial_complete")

        # 3. while a checkpoint is being taken in: trial 1 is not trained again, trial 2 starts
        leg = Leg(tmp_path, resume, 3, kill_at="checkpoint:1")
        _crashed(leg, "checkpoint")

        # 4. in the middle of an epoch; then the checkpoint Tune's snapshot names is lost
        # (as checkpoint retention deleted it in the reported crash)
        pause = tmp_path / "pause-epoch.pid"
        leg = Leg(tmp_path, resume, 4, stall_at=f"1:1:{pause}")
        leg.wait_for(pause)
        lost_dir = _running_trial_dir(study_dir, uri, parent)
        os.kill(leg.proc.pid, signal.SIGKILL)
        leg.kill()
        checkpoints = sorted(lost_dir.glob("checkpoint_*"))
        assert checkpoints, f"no checkpoint in {lost_dir}"
        for ckpt in checkpoints:
            shutil.rmtree(ckpt)

        # 5. the MLflow server goes away while an epoch's results are written, and comes back
        pause = tmp_path / "pause-store.pid"
        leg = Leg(tmp_path, resume, 5, stall_at=f"1:1:{pause}")
        leg.wait_for(pause)
        server.stop()
        Path(str(pause) + ".go").touch()  # the epoch ends and its results wait for the store
        time.sleep(10)
        server = start_mlflow_server(server_dir, port=port)
        code = leg.wait()
        out = leg.output()
        assert code == 0, out[-4000:]
        assert "is gone; continuing from scratch" in out, out[-4000:]
        _check_everything_logged_once(uri, parent)
    finally:
        server.stop()


def _check_everything_logged_once(uri: str, parent: str) -> None:
    c = tracking.client(uri)
    assert c.get_run(parent).info.status == "FINISHED"
    runs = tracking.tracker(uri).children("tests", parent)
    trial_ids = [r.data.tags["pisa.trial_id"] for r in runs]
    assert len(runs) == TRIALS and len(set(trial_ids)) == TRIALS, trial_ids
    for run in runs:
        assert run.info.status == "FINISHED", (run.data.tags.get("pisa.trial_id"), run.data.tags)
        assert run.data.tags["pisa.status"] == "finished"
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "bbox_mAP"))
        assert steps == list(range(1, EPOCHS + 1)), (run.data.tags["pisa.trial_id"], steps)  # none lost or repeated
