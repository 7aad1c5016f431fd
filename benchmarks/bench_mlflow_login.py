"""What an MLflow server with a login (`--app-name basic-auth`) spends per request.

MLflow checks each request's password against its stored scrypt hash unless a successful
check is cached (`auth_cache_ttl_seconds`, off in MLflow's defaults). Two servers, one
after the other, on a copy of the same empty store: MLflow's default login settings, then
docker/mlflow-auth.ini (the compose file's, with the cache). Each gets the same client
work, what a trial's logger does: a run, then `--requests` single-metric writes with the
login. The figure is the server's CPU time (its process and the uvicorn worker) over that
work, and its ratio to the default's:

    python benchmarks/bench_mlflow_login.py                   # 200 requests
    python benchmarks/bench_mlflow_login.py --requests 500 --json login.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import MlflowServer  # noqa: E402  (the benchmarks' MLflow server)

REPO = Path(__file__).resolve().parents[1]
CACHED_CONFIG = REPO / "docker" / "mlflow-auth.ini"


def _server_cpu(pid: int) -> float:
    """CPU seconds of the server and its workers so far."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(config: Path | None, requests: int, work: Path) -> dict[str, float]:
    """Start a basic-auth server (with `config`, or MLflow's defaults), do the client work,
    and return the server's CPU seconds for it."""
    work.mkdir(parents=True)
    password = "Pw-" + secrets.token_hex(8)
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    if config is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    server = MlflowServer(work, args=["--app-name", "basic-auth"], env=env)
    assert server.group is not None
    try:
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        from mlflow import MlflowClient

        client = MlflowClient(server.uri)
        experiment = client.create_experiment("login")  # the first authenticated request
        time.sleep(1.0)  # the server settles after start-up
        before, started = _server_cpu(server.group.pid), time.perf_counter()
        run = client.create_run(experiment)
        for step in range(requests):
            client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
        client.set_terminated(run.info.run_id)
        wall = time.perf_counter() - started
        cpu = _server_cpu(server.group.pid) - before
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        server.stop()
    return {"server_cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "requests": requests + 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="metric writes per server (default 200)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pisa-login-") as tmp:
        default = measure(None, args.requests, Path(tmp) / "default")
        cached = measure(CACHED_CONFIG, args.requests, Path(tmp) / "cached")
    servers = {"mlflow_defaults": default, "docker_mlflow_auth_ini": cached}
    out: dict[str, Any] = {
        **servers,
        "server_cpu_ratio": round(cached["server_cpu_s"] / default["server_cpu_s"], 3),
        "wall_ratio": round(cached["wall_s"] / default["wall_s"], 3),
    }
    for name, r in servers.items():
        per = 1000 * r["server_cpu_s"] / r["requests"]
        print(f"{name:24s} server {r['server_cpu_s']:7.2f} CPU-s ({per:5.1f} ms/request), wall {r['wall_s']:6.2f} s")
    print(f"cached / default: server CPU x{out['server_cpu_ratio']}, wall x{out['wall_ratio']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
