"""Container and cluster deployment files: docker/ (image, compose, KubeRay, `ray up`).

Fast, engine-free checks: the files parse, reference what exists, publish nothing beyond
127.0.0.1 by default, hold no credentials, and install with the same recipe as the Makefile.
`docker compose config` runs too where the compose plugin is installed.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
RAYJOB = DOCKER / "kuberay-rayjob.yaml"
RAY_CLUSTER = DOCKER / "ray-cluster.example.yaml"
WORKER_SCRIPT = DOCKER / "ray-worker.sh"

SECRET_NAME = re.compile(r"PASS(WORD)?|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR:?error}` with `env` (default: empty)."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            return value if value else arg
        if op in (":?", "?"):
            if not value:
                raise KeyError(f"required variable {name} is unset: {arg}")
            return value
        return value or ""

    return VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _walk_strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_strings(v)
    elif isinstance(node, str):
        yield node


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# ---------------------------------------------------------------- compose


def _compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_accepts_the_file():
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    rendered = json.loads(proc.stdout)
    assert set(rendered["services"]) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    for name, service in rendered["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_compose_has_the_services_and_each_has_an_image_or_build(services):
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
    assert services["postgres"]["image"].startswith("postgres:16")


def test_compose_paths_exist(services):
    for name, service in services.items():
        build = service.get("build")
        if build:
            build = {"context": build} if isinstance(build, str) else build
            context = (DOCKER / interpolate(build.get("context", "."))).resolve()
            assert context.is_dir(), (name, context)
            dockerfile = context / interpolate(build.get("dockerfile", "Dockerfile"))
            assert dockerfile.resolve() == DOCKERFILE.resolve(), (name, dockerfile)
        env_files = service.get("env_file") or []
        for entry in [env_files] if isinstance(env_files, str) else env_files:
            path = entry if isinstance(entry, str) else entry["path"]
            required = True if isinstance(entry, str) else entry.get("required", True)
            # the real docker/.env is created from the example; the example must exist
            target = DOCKER / path
            assert target.exists() or not required or target == DOCKER / ".env", (name, path)
    # the worker's start script is in the build context and runs with bash
    assert services["ray-worker"]["command"][:2] == ["bash", "docker/ray-worker.sh"]
    assert WORKER_SCRIPT.is_file()


def test_compose_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in services.values():
        for vol in service.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")):
                used.add(source)
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert {"postgres-data", "mlflow-artifacts", "pisa-data"} <= used
    mounts = {n: [v.split(":")[1] for v in s.get("volumes", [])] for n, s in services.items()}
    assert "/data" in mounts["ray-head"] and "/data" in mounts["ray-worker"]
    assert "/var/lib/postgresql/data" in mounts["postgres"]


def test_published_ports_bind_to_loopback_by_default(services):
    published = 0
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert isinstance(port, str), f"{name}: use the short syntax HOST_IP:HOST:CONTAINER"
            rendered = interpolate(port)
            assert rendered.startswith("127.0.0.1:"), (name, port)
            # and with the shipped example env
            assert interpolate(port, read_env_file(ENV_EXAMPLE)).startswith("127.0.0.1:"), (name, port)
            published += 1
    assert published == 3  # dashboard, Ray client, MLflow UI
    assert "ports" not in services["postgres"]
    head_ports = " ".join(services["ray-head"]["ports"])
    assert "${PISA_BIND:-127.0.0.1}:8265:8265" in head_ports and "${PISA_BIND:-127.0.0.1}:10001:10001" in head_ports
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]


def test_compose_holds_no_credentials(services):
    text = COMPOSE.read_text()
    for name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", value), (
                    f"{name}.{key} must come from the env file, got {value!r}"
                )
    # no user:password@ in any URI
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text)
    for s in _walk_strings(services):
        assert "change-me" not in s


def test_env_example_defines_every_required_variable_with_placeholders():
    required = {m.group("name") for m in VAR.finditer(COMPOSE.read_text()) if m.group("op") in (":?", "?")}
    example = read_env_file(ENV_EXAMPLE)
    assert required, "credentials should be required variables"
    assert required <= set(example), f"missing in .env.example: {required - set(example)}"
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value == "change-me", f"{key} in .env.example must be a placeholder"
    assert "change" in ENV_EXAMPLE.read_text().lower()
    # every required variable makes the rendering fail when unset
    with pytest.raises(KeyError):
        interpolate(COMPOSE.read_text())
    interpolate(COMPOSE.read_text(), example)


def test_env_file_is_ignored_by_git_and_docker():
    gitignore = (REPO / ".gitignore").read_text().splitlines()
    assert "/docker/.env" in gitignore
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    for pattern in (".venv", ".git", "data", "mlflow.db", "ray_results", "docker/.env", ".env"):
        assert pattern in dockerignore, pattern


def test_services_are_wired_together(services):
    head, worker, mlflow = services["ray-head"], services["ray-worker"], services["mlflow"]
    assert _environment(head)["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    head_cmd = " ".join(head["command"])
    assert "ray start --head" in head_cmd and "--ray-client-server-port=10001" in head_cmd
    assert "--dashboard-host=0.0.0.0" in head_cmd and "--block" in head_cmd
    assert "--address=ray-head:6379" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "container_name" not in worker, "a fixed container name prevents --scale"
    cmd = mlflow["command"]
    arg = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert arg("--backend-store-uri").startswith("postgresql://postgres:5432/")
    assert arg("--host") == "0.0.0.0"
    assert arg("--artifacts-destination") in [v.split(":")[1] for v in mlflow["volumes"]]
    # in-network clients reach it as http://mlflow:5000: the Host header must be allowed
    assert "mlflow:*" in interpolate(arg("--allowed-hosts"))
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("ray-head", "ray-worker"):
        env = _environment(services[name])
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_the_mlflow_login_caches_its_password_checks_and_keeps_its_users_in_the_volume(services, monkeypatch):
    """The login's settings file is the repository's (copied into the image's WORKDIR), MLflow
    reads it, and it turns the credential cache on (off in MLflow's defaults: every request's
    password checked against its scrypt hash) with the user store in the mlflow-auth volume."""
    from mlflow.server.auth.config import read_auth_config

    mlflow = services["mlflow"]
    in_image = _environment(mlflow)["MLFLOW_AUTH_CONFIG_PATH"]
    workdir = re.search(r"^WORKDIR (\S+)$", (DOCKER / "Dockerfile").read_text(), re.M).group(1)
    assert in_image.startswith(workdir + "/")
    local = REPO / in_image.removeprefix(workdir + "/")
    assert local == DOCKER / "mlflow-auth.ini" and local.is_file()
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(local))
    config = read_auth_config()
    assert config.auth_cache_ttl_seconds > 0 and config.admin_username == "admin"
    assert config.default_permission == "READ"
    # a relative SQLite path: the user store is in the server's working directory, the volume
    assert config.database_uri == "sqlite:///basic_auth.db"
    assert f"{mlflow['working_dir']}" in [v.split(":")[1] for v in mlflow["volumes"]]
    settings = configparser.ConfigParser()
    settings.read(local)
    assert not settings.has_option("mlflow", "admin_password")  # from the environment only


def test_one_gpu_worker_container_per_host_holds_every_gpu(services):
    """Training workers of one host share a container: NCCL over NVLink/shared memory,
    not over sockets between per-GPU containers."""
    worker = services["ray-worker"]
    env = _environment(worker)
    assert interpolate(env["PISA_GPUS_PER_WORKER"]) == "all"
    assert read_env_file(ENV_EXAMPLE)["PISA_GPUS_PER_WORKER"] == "all"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert "replicas" not in (worker.get("deploy") or {})
    shm = interpolate(worker["shm_size"])
    assert shm.endswith("gb") and int(shm[:-2]) >= 8, shm
    readme = (DOCKER / "README.md").read_text()
    assert "NCCL" in readme and "--scale ray-worker=2" not in readme


# ---------------------------------------------------------------- Dockerfile


def _pip_install_args(text: str) -> list[str]:
    """The arguments of every `pip install` in a Makefile/Dockerfile, without the flags that
    change how, not what, it installs (output, cache, byte-compiling: a venv skips it, an
    image keeps it so that containers start without compiling)."""
    text = text.replace("\\\n", " ")
    out = []
    for m in re.finditer(r"pip install ([^\n;&|]+)", text):
        how = ("--quiet", "-q", "--no-cache-dir", "--no-compile")
        args = [a for a in shlex.split(m.group(1)) if a not in how]
        out.append(" ".join(args))
    return out


def test_dockerfile_installs_with_the_makefile_recipe():
    make = [a for a in _pip_install_args((REPO / "Makefile").read_text()) if "constraints.txt" in a]
    assert make == ["-c constraints.txt -e .[dev]"], make
    docker = _pip_install_args(DOCKERFILE.read_text())
    assert make[0] in docker, docker
    # one source of truth for versions: constraints.txt and pyproject.toml, none here
    for args in docker:
        assert "-c constraints.txt" in args, args
        assert not re.search(r"[=<>~!]=|[<>]\d", args), f"version pinned in the Dockerfile: {args}"
    text = DOCKERFILE.read_text()
    assert "COPY --chown=ray:users pyproject.toml constraints.txt" in text


def test_dockerfile_runs_as_non_root_and_holds_no_secrets():
    lines = [ln.strip() for ln in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0].startswith(("ARG BASE_IMAGE=", "FROM ")), instructions[0]
    users = [ln.split()[1] for ln in instructions if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), users
    for ln in instructions:
        if ln.upper().startswith(("ENV ", "ARG ")):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", ln) or [ln.split()[1]]:
                assert not SECRET_NAME.search(name), f"secret-looking {ln}"
    base = next(ln for ln in instructions if ln.startswith("ARG BASE_IMAGE="))
    assert base.split("=", 1)[1].startswith(("rayproject/ray:", "nvidia/cuda:"))
    assert "py311" in base
    assert any(ln.startswith(("CMD ", "ENTRYPOINT ")) and "pisa" in ln for ln in instructions)


# ---------------------------------------------------------------- worker GPU claiming


@pytest.fixture
def fake_node(tmp_path: Path) -> dict[str, str]:
    """PATH with a fake `nvidia-smi` (2 GPUs) and a fake `ray` that reports and holds on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nprintf '0, GPU-aaaa-0000\\n1, GPU-bbbb-1111\\n'\n")
    (bin_dir / "ray").write_text(
        '#!/bin/sh\necho "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} $*"\nexec sleep 60\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PISA_GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _start_worker(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(WORKER_SCRIPT), "--address=ray-head:6379"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_scaled_workers_claim_distinct_gpus(fake_node):
    fake_node = {**fake_node, "PISA_GPUS_PER_WORKER": "1"}
    procs = []
    try:
        seen = []
        for _ in range(2):
            p = _start_worker(fake_node)
            procs.append(p)
            seen.append(p.stdout.readline().strip())
        assert seen == [
            "CUDA_VISIBLE_DEVICES=0 start --address=ray-head:6379 --num-gpus=1 --block",
            "CUDA_VISIBLE_DEVICES=1 start --address=ray-head:6379 --num-gpus=1 --block",
        ]
        third = _start_worker(fake_node)
        _, err = third.communicate(timeout=30)
        assert third.returncode == 1 and "found 0 of 2" in err
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    # the locks die with their nodes: a new replica gets GPU 0 again
    p = _start_worker(fake_node)
    try:
        assert p.stdout.readline().strip().startswith("CUDA_VISIBLE_DEVICES=0 ")
    finally:
        p.kill()
        p.wait(timeout=10)


def test_worker_with_all_gpus_or_none(fake_node):
    for env in ({**fake_node, "PISA_GPUS_PER_WORKER": "all"}, fake_node):  # `all` is the default
        p = _start_worker(env)
        try:
            assert (
                p.stdout.readline().strip()
                == "CUDA_VISIBLE_DEVICES=0,1 start --address=ray-head:6379 --num-gpus=2 --block"
            )
        finally:
            p.kill()
            p.wait(timeout=10)
    # no usable GPU: nvidia-smi fails (no driver) -> a CPU-only node
    (Path(fake_node["PATH"].split(":")[0]) / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    p = _start_worker(fake_node)
    try:
        assert (
            p.stdout.readline().strip()
            == "CUDA_VISIBLE_DEVICES=unset start --address=ray-head:6379 --num-gpus=0 --block"
        )
    finally:
        p.kill()
        p.wait(timeout=10)


# ---------------------------------------------------------------- KubeRay, ray up


def test_kuberay_rayjob_uses_the_image_and_secret_refs():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "pisa study run studies/" in spec["entrypoint"] and "--address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(
        w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1 for w in workers
    )
    containers = [head] + [w["template"]["spec"]["containers"][0] for w in workers]
    images = {c["image"] for c in containers}
    assert len(images) == 1 and "pisa" in images.pop()
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["key"]
        for name, e in env.items():
            if SECRET_NAME.search(name):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], name
    assert "secretKeyRef" in RAYJOB.read_text()
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", RAYJOB.read_text())


def test_ray_cluster_example_runs_the_image_without_inline_secrets():
    cfg = yaml.safe_load(RAY_CLUSTER.read_text())
    assert "pisa" in cfg["docker"]["image"]
    assert any("--gpus" in opt for opt in cfg["docker"]["run_options"])
    assert any(opt.endswith(":/data") for opt in cfg["docker"]["run_options"])
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    text = RAY_CLUSTER.read_text()
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)
    assert "BEGIN" not in text  # no inline key material
    assert cfg["auth"]["ssh_private_key"].startswith(("~", "/"))


def test_docker_readme_documents_the_workflow():
    readme = (DOCKER / "README.md").read_text()
    for needle in (
        "Why one pod per node and not one per GPU",
        "docker compose --env-file docker/.env -f docker/compose.yaml up -d\n",
        "pisa study run",
        "--address auto",
        "http://127.0.0.1:5000",
        "TORCH_INDEX_URL",
        "ray up",
        "KubeRay",
        "kuberay-rayjob.yaml",
        "ray-cluster.example.yaml",
    ):
        assert needle in readme, needle


def _ray_resources_of(job: dict) -> dict[str, float]:
    """What Ray would count on the RayJob's cluster: KubeRay starts each pod with `num-gpus`
    (else its container's nvidia.com/gpu limit) and its container's CPU limit as `num-cpus`."""
    cluster = job["spec"]["rayClusterSpec"]

    def pod(params: dict, container: dict) -> tuple[float, float]:
        limits = container["resources"]["limits"]
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        return gpus, float(params.get("num-cpus", limits["cpu"]))

    head = cluster["headGroupSpec"]
    gpus, cpus = pod(head["rayStartParams"], head["template"]["spec"]["containers"][0])
    for group in cluster["workerGroupSpecs"]:
        g, c = pod(group["rayStartParams"], group["template"]["spec"]["containers"][0])
        gpus, cpus = gpus + group["replicas"] * g, cpus + group["replicas"] * c
    return {"GPU": gpus, "CPU": cpus}


def test_kuberay_workers_are_one_pod_per_gpu_node_and_the_plan_sees_8_gpus(tmp_path, monkeypatch):
    """One worker pod per GPU node holding all its GPUs (as compose.yaml's one container per
    host): a trial's 8 NCCL ranks share one pod's network namespace and /dev/shm, not sockets."""
    import ray

    from pisa.planning.cost_plan import plan_study
    from pisa.search.study import load_study

    job = yaml.safe_load(RAYJOB.read_text())
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) == 1
    (group,) = groups
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    res = container["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 8  # a whole 8-GPU node
    assert group["rayStartParams"]["num-gpus"] == "8"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    # NCCL's shared-memory transport between the pod's ranks: /dev/shm a memory volume, not 64 MiB
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"].endswith("Gi")
    assert int(volume["emptyDir"]["sizeLimit"][:-2]) >= 32

    # `pisa study plan --address` on that cluster: Ray's totals as KubeRay would start it
    totals = _ray_resources_of(job)
    assert totals == {"GPU": 8.0, "CPU": 4.0 + 64.0}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: totals)
    study = load_study(
        REPO / "studies" / "faster_rcnn_r50_coco.yaml",
        ["resources_per_trial.pack=null", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
    )
    plan = plan_study(study.workload(), address="ray://pisa-study-head-svc:10001", images=1600)
    assert plan.cluster.gpus == 8 and "8 GPUs" in plan.cluster.where
    assert plan.at_once == 1  # one trial of 8 workers x 1 GPU at a time, as the study asks
