"""Real services on 127.0.0.1 for the cluster tests, each started as its own process group
and stopped by that group's id: an S3-compatible server (moto), an `mlflow server` with
its basic-auth app, and a two-node Ray cluster (`ray start` head + node)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO

from pisa.core.service_wait import ServiceDown, wait_for_http
from pisa.tracking.sqlite_template import seed_store
from pisa.training.ray_runtime import free_port  # the product's: outside Ray's worker port range

RAY = str(Path(sys.executable).parent / "ray")


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group this test started, SIGKILL what is left after `grace`."""
    stop_groups([proc], grace)


def stop_groups(procs: list[subprocess.Popen], grace: float = 20) -> None:
    """`stop_group` for several groups at once: all get SIGTERM together and share one
    `grace`, so services that each take seconds to shut down do so side by side."""

    def signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:  # the leader's children may still run, or the leader itself
        signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    try:
        wait_for_http(url, proc.poll, what, timeout, interval=0.5)
    except ServiceDown as exc:
        pytest.fail(f"{exc}:\n{log.read_text()[-4000:]}", pytrace=False)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env or dict(os.environ), cwd=cwd, start_new_session=True
        )


# ---------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """pyarrow's (and boto's) settings for this server, as on every node of a cluster."""
        return s3_env(self.endpoint)


def s3_env(endpoint: str) -> dict[str, str]:
    """pyarrow's (and boto's) settings for the moto server at `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "pisa-test",
        "AWS_SECRET_ACCESS_KEY": "pisa-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def start_s3(work: Path, bucket: str = "pisa", port: int | None = None) -> S3Server:
    """A moto server on 127.0.0.1:`port` (a free one by default) with `bucket` made."""
    port = port or free_port()
    proc = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], work / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    _wait_http(endpoint + "/moto-api/", proc, work / "moto.log", "moto server")
    server = S3Server(endpoint, bucket, proc)
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="pisa-test",
        aws_secret_access_key="pisa-test-secret",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return server


# ---------------------------------------------------------------- MLflow servers


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    work: Path
    user: str | None = None  # the login, for a server started with one

    @property
    def log_file(self) -> Path:
        return self.work / "mlflow-server.log"

    @property
    def artifacts(self) -> Path:
        return self.work / "artifacts"

    def stop(self) -> None:
        stop_group(self.process)  # the server and its uvicorn workers


def start_mlflow_server(
    work: Path,
    backend_store_uri: str | None = None,
    env: dict[str, str] | None = None,
    admin_password: str | None = None,
    port: int | None = None,
) -> MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with proxied artifacts in `work` and a SQLite store
    there unless `backend_store_uri` says otherwise. `admin_password` starts it with its
    login (`--app-name basic-auth`), the password from the environment as in
    docker/compose.yaml (never on a command line). The caller's MLFLOW_* settings stay out."""
    port = port or free_port()  # a given port: the same server started again
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("MLFLOW_")}
    # no job runner: its consumer processes (several, each importing MLflow) serve MLflow's
    # server-side jobs, which pisa does not use, and would take CPU from the tests
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    if backend_store_uri is None:  # a copy of an empty store: MLflow's migrations, skipped
        seed_store(work / "server.db")
    login: list[str] = []
    if admin_password is not None:
        env.update(
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
            MLFLOW_AUTH_CONFIG_PATH=str(REPO / "docker" / "mlflow-auth.ini"),  # compose's login settings
        )
        login = ["--app-name", "basic-auth"]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *login,
        "--backend-store-uri",
        backend_store_uri or f"sqlite:///{work / 'server.db'}",
        "--artifacts-destination",
        str(work / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = MlflowServer(f"http://127.0.0.1:{port}", start(cmd, work / "mlflow-server.log", env=env, cwd=work), work)
    if admin_password is not None:
        server.user = "admin"
    try:
        _wait_http(server.uri + "/health", server.process, server.log_file, "mlflow server", timeout=300)
    except BaseException:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------- a two-node Ray cluster


@dataclass
class RayCluster:
    gcs_address: str
    client_address: str
    dashboard: str
    temp_dirs: list[Path]
    processes: list[subprocess.Popen] = field(default_factory=list)


def short_temp_root() -> Path:
    """A fresh directory directly under /tmp: Ray puts its plasma socket five levels below a
    node's temp dir, and an AF_UNIX path may hold 107 bytes, which pytest's own temp paths
    (`/tmp/pytest-of-<user>/pytest-<n>/<test>/...`) can exceed."""
    return Path(tempfile.mkdtemp(prefix="pisa-ray-", dir="/tmp"))


def ensure_ray_token(env: dict[str, str]) -> None:
    """A machine where Ray has run before holds a token (~/.ray/auth_token, which a local
    ray.init writes); `ray start --head` with token auth needs one, so make sure of it on a
    fresh machine, whatever ran before (`ray get-auth-token --generate`)."""
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)


def start_ray_cluster(
    work: Path,
    env: dict[str, str],
    node_resource: str | None,
    attempts: int = 3,
    nodes: int = 2,
    cpus_per_node: int = 1,
) -> RayCluster:
    """A head and `nodes - 1` more nodes on 127.0.0.1, `cpus_per_node` CPUs and one
    `node_resource` each, each with its own temp dir; `ray start --block` keeps every node's
    processes in one group. A node that fails to register in time (Ray allows 30 s; a busy
    CI machine can need more) is started again."""
    sockets_root = short_temp_root()
    for attempt in range(attempts):
        gcs, client, dash = free_port(), free_port(), free_port()
        temp_dirs = [sockets_root / f"{'head' if i == 0 else f'node{i}-'}{attempt}" for i in range(nodes)]
        common = [
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(cpus_per_node),
            "--block",
            "--disable-usage-stats",
        ]
        if node_resource is not None:
            common += ["--resources", json.dumps({node_resource: 1})]
        cluster = RayCluster(f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}", f"http://127.0.0.1:{dash}", temp_dirs)
        logs = [work / f"ray-{'head' if i == 0 else f'node{i}'}-{attempt}.log" for i in range(nodes)]
        head_args = [
            "--head",
            "--port",
            str(gcs),
            "--ray-client-server-port",
            str(client),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
        ]
        try:
            for i in range(nodes):
                where = head_args if i == 0 else ["--address", cluster.gcs_address]
                proc = start([RAY, "start", *where, "--temp-dir", str(temp_dirs[i]), *common], logs[i], env=env)
                cluster.processes.append(proc)
                if not _wait_nodes(cluster, env, i + 1, proc, logs[i]) or cluster.processes[0].poll() is not None:
                    break
            else:
                return cluster
        except BaseException:
            stop_ray_cluster(cluster)
            raise
        stop_ray_cluster(cluster)
    shutil.rmtree(sockets_root, ignore_errors=True)
    pytest.fail(
        f"no {nodes}-node Ray cluster after {attempts} attempts:\n"
        + "\n".join(log.read_text()[-3000:] for log in logs if log.exists()),
        pytrace=False,
    )


def _wait_nodes(cluster: RayCluster, env: dict[str, str], n: int, proc, log: Path, timeout: float = 300) -> bool:
    """True once `n` nodes are alive; False if the node process `proc` exited first."""
    script = (
        f"import ray; ray.init(address={cluster.gcs_address!r}, log_to_driver=False); "
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return True
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
    return False


def stop_ray_cluster(cluster: RayCluster) -> None:
    """Stops the nodes side by side and deletes their temp dirs (session logs and spilled
    objects, hundreds of MB per cluster) so a suite run leaves nothing under /tmp. A node
    given SIGTERM takes over 30 s to wind down its processes: they hold nothing the tests
    need, so a short grace then SIGKILL for what is left of each group."""
    stop_groups(cluster.processes, grace=3)
    for temp_dir in cluster.temp_dirs:
        shutil.rmtree(temp_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the short root, once its last attempt's dirs are gone
        cluster.temp_dirs[0].parent.rmdir()
