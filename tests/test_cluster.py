"""A study on a real two-node Ray cluster (`ray start` head + node on 127.0.0.1), through
its GCS address and through Ray Client (ray://), logging to an `mlflow server` with a
login (basic-auth app): trials land on both nodes, everything is logged with the
credentials from the environment, and the password appears in no output and no file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import mlflow_client, tiny_experiment
from services import (
    RayCluster,
    ensure_ray_token,
    start_ray_cluster,
    stop_ray_cluster,
)

from pisa import tracking

PISA = [sys.executable, "-m", "pisa.cli"]
NODE_RESOURCE = "pisa_node"  # one per node, one per trial worker: two trials, two nodes
PASSWORD = "Pw-" + os.urandom(9).hex()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def mlflow_login(mlflow_server):
    return mlflow_server(admin_password=PASSWORD)


@pytest.fixture(scope="module")
def env(mlflow_login) -> dict[str, str]:
    """A user's shell: Ray token auth on (see the docker README) and MLflow credentials."""
    return {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_USERNAME": mlflow_login.user,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }


@pytest.fixture(scope="module")
def cluster(work, env):
    ensure_ray_token(env)
    # the nodes hold the credentials too: through Ray Client the study's logger runs there
    c = start_ray_cluster(work, env, NODE_RESOURCE)
    yield c
    stop_ray_cluster(c)
    shutil.rmtree(c.temp_dirs[0].parent, ignore_errors=True)


def _study_file(work: Path, synthetic_dir: Path, uri: str, trial_process: str = "ray_train") -> Path:
    base = tiny_experiment(synthetic_dir, work, epochs=1)
    base["tracking"]["uri"] = uri
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "cluster",
        "base": "base.yaml",
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "search_space": {"model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0}},
        "resources_per_trial": {
            "workers": 1,
            "gpus_per_worker": 0,
            "cpus_per_worker": 0.5,
            "resources_per_worker": {NODE_RESOURCE: 1},
        },
        # through the GCS address: Ray Train workers spread over the nodes; through Ray
        # Client: trials that train in their own process (the default for 1 worker)
        "trial_process": trial_process,
        "scheduler": {"type": "fifo"},
    }
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _train_worker_nodes(cluster: RayCluster, env: dict[str, str], class_name: str = "RayTrainWorker") -> dict[str, str]:
    """actor id -> node id of every actor of `class_name` the cluster has run (state API): Ray
    Train workers, or `ImplicitFunc`, a Tune trial of a function trainable."""
    script = (
        "import json; from ray.util.state import list_actors; "
        f"print(json.dumps({{a.actor_id: a.node_id for a in list_actors(address={cluster.dashboard!r}, "
        f"filters=[('class_name', '=', {class_name!r})], limit=1000, detail=True)}}))"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _without_auth_mode(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}


def test_a_cluster_with_token_auth_and_no_token_here_is_one_line_exit_2(
    work, synthetic_dir, mlflow_login, env, cluster
):
    """A machine without the cluster's token (no RAY_AUTH_TOKEN, no ~/.ray/auth_token): one
    line naming the fix, exit 2, without Ray's retries, and nothing started."""
    path = _study_file(work, synthetic_dir, mlflow_login.uri)
    home = work / "home-without-token"
    home.mkdir(exist_ok=True)
    shell = {k: v for k, v in _without_auth_mode(env).items() if not k.startswith("RAY_AUTH_TOKEN")}
    started = time.monotonic()
    res = _run_study(work, {**shell, "HOME": str(home)}, path, cluster.gcs_address, "no-token")
    took = time.monotonic() - started
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --address {cluster.gcs_address}: the Ray cluster needs token authentication")
    assert "RAY_AUTH_TOKEN" in last and "RAY_AUTH_MODE=token" in last
    assert "Traceback" not in res.stderr and res.stderr.count("InvalidAuthToken") <= 1, res.stderr[-3000:]
    assert not (work / "ray_results" / "no-token").exists()
    print(f"refused in {took:.1f} s")


def _run_study(work, env, study_file, address, name) -> subprocess.CompletedProcess:
    return subprocess.run(
        PISA + ["study", "run", str(study_file), "--address", address, "--set", f"name={name}"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_unauthenticated_write_is_refused(mlflow_login):
    request = urllib.request.Request(
        mlflow_login.uri + "/api/2.0/mlflow/experiments/create",
        data=b'{"name": "intruder"}',
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 401


def test_wrong_password_fails_before_any_trial(work, synthetic_dir, mlflow_login, env):
    path = _study_file(work, synthetic_dir, mlflow_login.uri)
    res = subprocess.run(
        PISA + ["study", "run", str(path), "--set", "name=denied"],
        cwd=work,
        env={**env, "MLFLOW_TRACKING_PASSWORD": "wrong"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert "refused user 'admin'" in res.stderr and "MLFLOW_TRACKING_PASSWORD" in res.stderr
    assert not (work / "ray_results" / "denied").exists()


@pytest.mark.parametrize("mode", ["gcs", "client"])
def test_two_node_study_with_login(work, synthetic_dir, mlflow_login, env, cluster, mode):
    path = _study_file(work, synthetic_dir, mlflow_login.uri, "ray_train" if mode == "gcs" else "auto")
    trainer = "RayTrainWorker" if mode == "gcs" else "ImplicitFunc"
    before = _train_worker_nodes(cluster, env, trainer)
    address = cluster.gcs_address if mode == "gcs" else cluster.client_address
    # the cluster runs with token auth; pisa finds the token (~/.ray/auth_token, which the
    # cluster's nodes read too) and uses it, without RAY_AUTH_MODE in the user's shell
    res = _run_study(work, _without_auth_mode(env), path, address, f"two-nodes-{mode}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    # trials on both nodes
    new = {a: n for a, n in _train_worker_nodes(cluster, env, trainer).items() if a not in before}
    assert len(set(new.values())) == 2, new

    # everything logged, with the credentials from the environment
    state = json.loads((work / "ray_results" / f"two-nodes-{mode}" / "pisa_study.json").read_text())
    assert state["tracking_uri"] == mlflow_login.uri
    os.environ.update(MLFLOW_TRACKING_USERNAME=mlflow_login.user, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        c = mlflow_client(mlflow_login.uri)
        assert c.get_run(state["parent_run_id"]).info.status == "FINISHED"
        runs = tracking.tracker(mlflow_login.uri).children("tests", state["parent_run_id"])
        assert len(runs) == 2
        for run in runs:
            assert run.info.status == "FINISHED" and "bbox_mAP" in run.data.metrics
            assert run.data.params["tracking.uri"] == mlflow_login.uri
            assert {"config.yaml", "checkpoint"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)

    # the password nowhere: not in the output, not in a file the study (or Ray) wrote
    assert PASSWORD not in res.stdout + res.stderr
    leaks = [
        p
        for root in (work, *cluster.temp_dirs)
        for p in Path(root).rglob("*")
        if p.is_file() and not p.is_symlink() and PASSWORD.encode() in p.read_bytes()
    ]
    assert not leaks
