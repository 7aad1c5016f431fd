"""Shared fixtures: the real BCCD dataset and a small generated synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

# Ray folds log lines that differ only in their numbers, from any training of this test
# session, into "[repeated Nx across cluster]": a test reading its own training's progress
# lines must see them all (read when Ray is first imported, so before any test module)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# One torch thread in the test processes and what they start outside Ray (whose workers get one
# per CPU they hold): two workers on two cores, each with torch's default of a thread per core,
# oversubscribe the machine, and OpenMP's threads spin while they wait. tests/test_models_two_stage.py
# beside a busy process took 276 CPU-seconds with the default and 46 with one thread
# (benchmarks/RESULTS.md, "The suite at one torch thread per process"). Read when torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from helpers import REPO
from services import MlflowServer, free_port, start_mlflow_server


def find_bccd() -> Path:
    """`$PISA_BCCD_DIR`, else the copy that ships with the repository (`datasets/bccd`)."""
    env = os.environ.get("PISA_BCCD_DIR")
    return Path(env) if env else REPO / "datasets" / "bccd"


# Seconds per file on a worker (benchmarks/RESULTS.md, "The suite on two workers"). `make test`
# runs the files on 2 pytest-xdist workers, a file per worker at a time (`--dist loadfile`),
# handed out longest first, so that no long file starts last and runs alone.
FILE_SECONDS = {  # the full suite on 2 workers, idle, 2026-12-06 at c94f62e (benchmarks/RESULTS.md)
    "test_chaos.py": 231,
    "test_study_budget_extend.py": 221,
    "test_train.py": 215,
    "test_recovery.py": 207,  # with the Optuna record on PostgreSQL
    "test_cluster.py": 186,
    "test_learning.py": 162,
    "test_validation_stage.py": 111,
    "test_seeds.py": 107,
    "test_study.py": 93,
    "test_paper_all_detectors.py": 79,  # 16 trainings, 2 at a time
    "test_model.py": 74,
    "test_compare.py": 73,
    "test_training_grid.py": 58,
    "test_models_two_stage.py": 48,
    "test_layouts.py": 41,
    "test_models_single_stage.py": 34,
    "test_gpu_check.py": 33,
    "test_postgres_mlflow.py": 32,
    "test_tracking.py": 29,
    "test_reference_table.py": 19,
    "test_accel.py": 17,
    "test_syncs.py": 16,
}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first (stable within a file and among the short ones)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    path = find_bccd()
    needed = [path / "train.json", path / "val.json", path / "images"]
    if not all(p.exists() for p in needed):
        pytest.fail(
            f"BCCD dataset not found at {path} (needs train.json, val.json, images/). "
            "It ships in datasets/bccd; set PISA_BCCD_DIR to use another copy.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shapes dataset (24 train, 8 val images), generated once per session."""
    from pisa.data import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n_train=24, n_val=8, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster (2 CPUs) for the whole session."""
    import ray

    from pisa.training.ray_runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- PostgreSQL + MLflow server
# A throwaway PostgreSQL server and a real `mlflow server` on top of it, both on 127.0.0.1,
# started once per session and always stopped. The MLflow server gets the database password
# from PGPASSWORD (libpq), never on its command line, as in docker/compose.yaml.

PG_USER = "pisa"
PG_SYSTEM_USER = "pisa-pg"  # created when the tests run as root and no `postgres` user exists


def find_pg_bin() -> Path:
    """The directory holding initdb/pg_ctl: `$PISA_PG_BIN`, the newest /usr/lib/postgresql/*/bin, or PATH."""
    import glob
    import shutil

    candidates = []
    if os.environ.get("PISA_PG_BIN"):
        candidates.append(Path(os.environ["PISA_PG_BIN"]))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += [Path(p) for p in versions]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    pytest.fail(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $PISA_PG_BIN, "
        "/usr/lib/postgresql/*/bin or PATH. Install them, e.g. `apt-get install postgresql` "
        "(.ci/run does this on Debian).",
        pytrace=False,
    )


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: the account to run it as, None when not root."""
    import pwd
    import subprocess

    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_SYSTEM_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER], check=True
    )
    return PG_SYSTEM_USER


class PostgresServer:
    """A running PostgreSQL server on 127.0.0.1 with password authentication."""

    def __init__(self, bin_dir: Path, root: Path, port: int, password: str, run_as: str | None):
        self.bin_dir, self.root, self.port, self.password, self.run_as = bin_dir, root, port, password, run_as
        self.host, self.user = "127.0.0.1", PG_USER
        self.data_dir, self.log_file = root / "data", root / "postgres.log"

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", self.run_as, "--"] if self.run_as else []) + list(args)

    def _run(self, *args: str, timeout: float = 120) -> None:
        import subprocess

        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = self.log_file.read_text()[-3000:] if self.log_file.exists() else ""
            pytest.fail(
                f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n{log}", pytrace=False
            )

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-locale",
        )
        pwfile.unlink()
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            f"-h {self.host} -p {self.port} -k {self.root}",
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        import subprocess

        subprocess.run(
            self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop"),
            capture_output=True,
            timeout=60,
        )

    def uri(self, database: str = "postgres", with_password: bool = False) -> str:
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", autocommit: bool = False):
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=10,
            autocommit=autocommit,
        )

    def query(self, sql: str, params: tuple = (), database: str = "postgres") -> list[tuple]:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        conn = self.connect(autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def mlflow_backend(self, database: str = "mlflow") -> tuple[str, dict[str, str]]:
        """Database `database` (created once) as an MLflow backend store: its URI, which holds
        no credentials, and the libpq environment that does (as in docker/compose.yaml)."""
        if not self.query("SELECT 1 FROM pg_database WHERE datname = %s", (database,)):
            self.create_database(database)
        env = {**os.environ, "PGUSER": self.user, "PGPASSWORD": self.password}
        return f"postgresql://{self.host}:{self.port}/{database}", env


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1:<free port>; fails (not skips) without binaries."""
    import secrets
    import shutil
    import tempfile

    bin_dir = find_pg_bin()
    run_as = _server_user()
    # not under pytest's tmp dir: that one is private to the current user (mode 700)
    root = Path(tempfile.mkdtemp(prefix="pisa-pg-"))
    if run_as:
        shutil.chown(root, run_as)
    server = PostgresServer(bin_dir, root, free_port(), secrets.token_urlsafe(16), run_as)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """Real `mlflow server`s on 127.0.0.1, one per kind, started when a test first asks and
    stopped when the session ends: `mlflow_server()` has a SQLite store,
    `mlflow_server(*postgres_server.mlflow_backend())` a PostgreSQL one, and
    `mlflow_server(admin_password=...)` MLflow's login."""
    started: dict[tuple[str | None, str | None], MlflowServer] = {}

    def server(
        backend_store_uri: str | None = None, env: dict[str, str] | None = None, admin_password: str | None = None
    ) -> MlflowServer:
        key = (backend_store_uri, admin_password)
        if key not in started:
            work = tmp_path_factory.mktemp("mlflow-server")
            started[key] = start_mlflow_server(work, backend_store_uri, env=env, admin_password=admin_password)
        return started[key]

    yield server
    for s in started.values():
        s.stop()


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting (or joining) Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("pisa.training.ray_runtime.init_ray", refuse)
