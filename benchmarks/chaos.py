"""Chaos with an exact answer: a study killed at random times ends with the undisturbed table.

One study, run twice: once undisturbed, once with K SIGKILLs at random times, each to one of

- the driver (the `pisa` process's group), after which `pisa study resume` continues it,
- a trial's process (Tune's `ray::ImplicitFunc` actor), which Tune restarts from its checkpoint,
- a Ray Train worker (`ray::RayTrainWorker`), whose worker group the trial's TorchTrainer
  restarts from its checkpoint,
- the MLflow server (its group), started again on the same port after a pause of 2-6 s,

and the two final tables must be equal: every trial's per-epoch metrics within 1e-6 (timers
left out), one MLflow run per point, every epoch logged once per metric, every run FINISHED.

The study is a FIFO search over fixed points (`points_to_evaluate`, `num_samples` its length:
no suggestion depends on the order trials end in) of the tiny CPU Faster R-CNN
(`pisa.core.small_configs.tiny_experiment`) on pisa's synthetic shapes, every trial a Ray Train
run of 2 CPU workers (`trial_process: ray_train`), one at a time. Its training is deterministic
on a CPU (`pisa.data.draws`: per-image seeded draws; a restart continues from a checkpoint of
the same state), so any difference is a lost, repeated or mixed-up result. Every `pisa` process
joins one `ray start` node (2 CPUs, --address), as on a cluster whose driver dies; the tracking
store is a real `mlflow server` (SQLite) on 127.0.0.1.

The kill times are drawn (`random.Random(--seed)`) uniformly over [10%, 90%] of the undisturbed
run's wall time, counted from the disturbed run's start; the targets are a seeded shuffle that
cycles through the four kinds. A target that is not there at its time (between trials, while a
driver starts) is killed as soon as it is; a driver only once the study can be resumed (its
state and Tune's are written), and no two kills less than 3 s apart.

    python benchmarks/chaos.py                          # 3 trials x 3 epochs, 10 kills, seed 0
    python benchmarks/chaos.py --kills 12 --seed 7 --json chaos.json

tests/test_chaos.py runs a short version (2 trials x 2 epochs, 4 kills).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pisa import tracking
from pisa.core.service_wait import ServiceDown, wait_for_http
from pisa.core.small_configs import tiny_experiment
from pisa.tracking.sqlite_template import seed_store
from pisa.training.ray_runtime import DRIVER_RESOURCE, free_port

PISA = [sys.executable, "-m", "pisa.cli"]
RAY = str(Path(sys.executable).parent / "ray")
NAME = "chaos"
SEARCHED = "model.isr_p.k"
TARGETS = ("driver", "trial", "worker", "mlflow")
# the Ray actors of a trial, by the process title Ray gives them
ACTOR_TITLES = {"trial": "ray::ImplicitFunc", "worker": "ray::RayTrainWorker"}
TIMERS = frozenset({"images_per_sec", "time_train_s", "time_eval_s"})  # the wall clock's, not the training's
TOLERANCE = 1e-6
MIN_GAP_S = 3.0


class ChaosError(RuntimeError):
    """The run could not go on (a process ended on its own, a service did not come up)."""


# ---------------------------------------------------------------- processes and services


class Group:
    """A command in its own process group (a session), its output in `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL to the whole group: the leader and whatever it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM to the group, SIGKILL to what is left after `grace`."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        self.kill()


def _wait_http(url: str, group: Group, what: str, timeout: float = 300) -> None:
    try:
        wait_for_http(url, group.proc.poll, what, timeout, interval=0.3)
    except ServiceDown as exc:
        raise ChaosError(f"{exc}:\n{group.tail()}") from None


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite store and proxied artifacts in `work`), as
    tests/services.py starts one; `restart` starts it again on the same port and store. `args`
    go to the server (`--app-name basic-auth`), `env` to its environment."""

    def __init__(self, work: Path, args: list[str] | None = None, env: dict[str, str] | None = None):
        self.work = work
        self.port = free_port()
        self.args = args or []
        self.env = env or {}
        self.group: Group | None = None
        self.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job consumers taking CPU
        env.update(self.env)
        seed_store(self.work / "server.db")  # a new store: a copy of an empty one (no migrations)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            *self.args,
            "--backend-store-uri",
            f"sqlite:///{self.work / 'server.db'}",
            "--artifacts-destination",
            str(self.work / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.group = Group(cmd, self.work / "mlflow-server.log", env=env, cwd=self.work)
        _wait_http(self.uri + "/health", self.group, "mlflow server")

    def kill(self) -> int:
        assert self.group is not None
        pid = self.group.pid
        self.group.kill()
        return pid

    def stop(self) -> None:
        if self.group is not None:
            self.group.stop()


class RayNode:
    """One `ray start --head` node (2 CPUs, and the slots pisa's trial drivers take), its
    processes in one group; its temp dir directly under /tmp (Ray's socket paths are short)."""

    def __init__(self, work: Path, cpus: int = 2):
        self.temp = Path(tempfile.mkdtemp(prefix="pisa-chaos-", dir="/tmp"))
        self.address = f"127.0.0.1:{free_port()}"
        cmd = [
            RAY,
            "start",
            "--head",
            "--port",
            self.address.rsplit(":", 1)[1],
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(cpus),
            "--resources",
            json.dumps({DRIVER_RESOURCE: 10_000}),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(free_port()),
            "--ray-client-server-port",
            str(free_port()),
            "--temp-dir",
            str(self.temp),
            "--disable-usage-stats",
            "--block",
        ]
        # token auth, as `ray start` turns it on: a token in ~/.ray/auth_token, which every
        # `pisa` process joining the node finds and sends
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_AUTH_MODE"] = "token"
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=120)
        self.group = Group(cmd, work / "ray-head.log", env=env)
        self._wait_up(env)

    def _wait_up(self, env: dict[str, str], timeout: float = 300) -> None:
        probe = f"import ray; ray.init(address={self.address!r}, log_to_driver=False); print(len(ray.nodes()))"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.group.proc.poll() is not None:
                raise ChaosError(f"ray start exited ({self.group.proc.returncode}):\n{self.group.tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                out = subprocess.run(
                    [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
                )
                if out.returncode == 0 and out.stdout.strip().endswith("1"):
                    return
            time.sleep(1)
        raise ChaosError(f"no Ray node after {timeout:.0f} s:\n{self.group.tail()}")

    def actors(self, kind: str) -> list[int]:
        """The pids of this node's processes of `kind` (trial, worker), newest first: a killed
        driver's actors may linger a moment before Ray ends them."""
        title = ACTOR_TITLES[kind]
        found = [pid for pid in descendants(self.group.pid) if _cmdline(pid).startswith(title)]
        return sorted(found, key=_started, reverse=True)

    def stop(self) -> None:
        self.group.stop(grace=3)
        shutil.rmtree(self.temp, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _started(pid: int) -> int:
    """The process's start time (clock ticks since boot; 0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def descendants(root: int) -> set[int]:
    """Every process below `root` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# ---------------------------------------------------------------- the study


@dataclass(frozen=True)
class Plan:
    """What both runs train: `trials` fixed points of `epochs` epochs each."""

    trials: int = 3
    epochs: int = 3

    @property
    def points(self) -> list[float]:
        return [round(0.5 + 2.5 * i / max(1, self.trials - 1), 4) for i in range(self.trials)]


def write_study(work: Path, data_dir: Path, uri: str, plan: Plan, experiment: str) -> Path:
    """The study file (and its base config) in `work`, its storage in `work/ray_results`."""
    work.mkdir(parents=True, exist_ok=True)
    # restarts without limit: the kills, not the retries, decide how often a trial starts again
    base = tiny_experiment(data_dir, work, epochs=plan.epochs, max_failures=-1)
    base["tracking"] = {"uri": uri, "experiment": experiment}
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": NAME,
        "base": "base.yaml",
        "search_space": {SEARCHED: {"type": "uniform", "low": 0.5, "high": 3.0}},
        "points_to_evaluate": [{SEARCHED: k} for k in plan.points],
        "num_samples": plan.trials,
        "max_concurrent_trials": 1,
        "resources_per_trial": {"workers": 2, "gpus_per_worker": 0},
        "trial_process": "ray_train",
        "scheduler": {"type": "fifo"},
        "max_failures": 1000,
        "seed": 0,
    }
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    # MLflow's client retries an unreachable store after 1, 2, 4, ... s (factor 1, its default
    # 2 waits twice as long): the killed server is back within seconds
    env.update(PYTHONUNBUFFERED="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    return env


class Leg:
    """One `pisa` process of a run, in its own process group."""

    def __init__(self, work: Path, args: list[str], index: int):
        self.index = index
        self.group = Group(PISA + args, work / f"leg{index}.log", env=_env(), cwd=work)

    def ended(self) -> int | None:
        return self.group.proc.poll()

    def wait(self, timeout: float) -> int:
        try:
            return self.group.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.group.kill()
            raise ChaosError(f"leg {self.index} did not end in {timeout:.0f} s:\n{self.group.tail()}") from None


def _run_args(study: Path, ray: RayNode) -> list[str]:
    return ["study", "run", str(study), "--address", ray.address]


def _resume_args(work: Path, ray: RayNode) -> list[str]:
    return ["study", "resume", NAME, "--storage-path", str(work / "ray_results"), "--address", ray.address]


def _resumable(work: Path) -> bool:
    study = work / "ray_results" / NAME
    return (study / "pisa_study.json").exists() and (study / "tuner.pkl").exists()


def parent_run(work: Path) -> str:
    return str(json.loads((work / "ray_results" / NAME / "pisa_study.json").read_text())["parent_run_id"])


# ---------------------------------------------------------------- the table and its checks


@dataclass
class Table:
    """A study's final table: per point, per metric, its logged (epoch, value) pairs in order."""

    rows: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # a duplicated run or epoch, an unfinished run


def read_table(uri: str, experiment: str, parent: str, plan: Plan) -> Table:
    tracker = tracking.tracker(uri)
    table = Table()
    study = tracker.run(parent)
    if study.info.status != "FINISHED":
        table.problems.append(f"study run {parent} is {study.info.status}")
    for run in tracker.children(experiment, parent):
        point = run.data.params.get(SEARCHED, "?")
        if point in table.rows:
            table.problems.append(f"point {SEARCHED}={point}: more than one run")
            continue
        if run.info.status != "FINISHED":
            table.problems.append(f"point {SEARCHED}={point}: run {run.info.run_id} is {run.info.status}")
        metrics: dict[str, list[tuple[int, float]]] = {}
        for key in sorted(run.data.metrics):
            if key in TIMERS or key.startswith("system/"):
                continue
            history = sorted((m.step, m.value) for m in tracker.metric_history(run.info.run_id, key))
            steps = [step for step, _ in history]
            if steps != list(range(1, plan.epochs + 1)):
                table.problems.append(f"point {SEARCHED}={point}: {key} logged at epochs {steps}")
            metrics[key] = history
        table.rows[point] = metrics
    if len(table.rows) != plan.trials:
        table.problems.append(f"{len(table.rows)} points in the table, {plan.trials} expected")
    return table


def differences(reference: Table, other: Table, tolerance: float = TOLERANCE) -> list[str]:
    """Where `other` is not `reference` (relative to the larger value, at least absolute)."""
    found = []
    if set(reference.rows) != set(other.rows):
        found.append(f"points {sorted(reference.rows)} != {sorted(other.rows)}")
    for point in sorted(set(reference.rows) & set(other.rows)):
        a, b = reference.rows[point], other.rows[point]
        if set(a) != set(b):
            found.append(f"point {point}: metrics {sorted(set(a) ^ set(b))} in one table only")
        for key in sorted(set(a) & set(b)):
            if [s for s, _ in a[key]] != [s for s, _ in b[key]]:
                found.append(f"point {point}: {key} at epochs {[s for s, _ in a[key]]} != {[s for s, _ in b[key]]}")
                continue
            for (step, x), (_, y) in zip(a[key], b[key], strict=True):
                if abs(x - y) > tolerance * max(1.0, abs(x), abs(y)):
                    found.append(f"point {point}: {key} epoch {step}: {x!r} != {y!r}")
    return found


# ---------------------------------------------------------------- the two runs


@dataclass
class Kill:
    planned_s: float  # the drawn time, from the disturbed run's start
    at_s: float  # when it happened
    target: str
    pid: int
    leg: int  # the `pisa` process running then


@dataclass
class Outcome:
    seed: int
    plan: Plan
    kills: list[Kill]
    planned_kills: int
    wall_s: dict[str, float]
    legs: int
    differences: list[str]
    problems: dict[str, list[str]]
    error: str | None = None  # the disturbed run did not end (its last lines)

    @property
    def equal(self) -> bool:
        return self.error is None and not self.differences and not any(self.problems.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["equal"] = self.equal
        out["kills_by_target"] = {t: sum(k.target == t for k in self.kills) for t in TARGETS}
        return out


def undisturbed(work: Path, data_dir: Path, server: MlflowServer, ray: RayNode, plan: Plan, timeout: float) -> float:
    study = write_study(work, data_dir, server.uri, plan, "chaos-undisturbed")
    started = time.monotonic()
    leg = Leg(work, _run_args(study, ray), 0)
    try:
        code = leg.wait(timeout)
    finally:
        leg.group.kill()  # what is left of its group, whatever happened
    if code != 0:
        raise ChaosError(f"the undisturbed run exited {code}:\n{leg.group.tail()}")
    return time.monotonic() - started


def kill_schedule(seed: int, kills: int, window: tuple[float, float]) -> list[tuple[float, str]]:
    """`kills` (time, target) pairs: times uniform over `window`, sorted; targets a shuffle of
    the four kinds repeated (each kind once in every four kills)."""
    rng = random.Random(seed)
    times = sorted(rng.uniform(*window) for _ in range(kills))
    targets = [TARGETS[i % len(TARGETS)] for i in range(kills)]
    rng.shuffle(targets)
    return list(zip(times, targets, strict=True))


def disturbed(
    work: Path,
    data_dir: Path,
    server: MlflowServer,
    ray: RayNode,
    plan: Plan,
    schedule: list[tuple[float, str]],
    seed: int,
    timeout: float,
    kills: list[Kill],
    say=print,
) -> tuple[float, int]:
    """The study under `schedule`'s kills (each delivered appended to `kills`); its wall time
    and the `pisa` processes it took."""
    study = write_study(work, data_dir, server.uri, plan, "chaos-killed")
    pause = random.Random(seed + 1)  # the MLflow server's time down
    started = time.monotonic()
    deadline = started + timeout
    legs = [Leg(work, _run_args(study, ray), 0)]
    try:
        _deliver(schedule, legs, kills, work, ray, server, pause, started, deadline, say)
        code = legs[-1].wait(max(1.0, deadline - time.monotonic()))
    finally:
        legs[-1].group.kill()  # what is left of its group, whatever happened
    if code != 0:
        raise ChaosError(f"leg {legs[-1].index} exited {code}:\n{legs[-1].group.tail()}")
    return time.monotonic() - started, len(legs)


def _deliver(
    schedule: list[tuple[float, str]],
    legs: list[Leg],
    kills: list[Kill],
    work: Path,
    ray: RayNode,
    server: MlflowServer,
    pause: random.Random,
    started: float,
    deadline: float,
    say,
) -> None:
    """Each kill of `schedule` at its time or once its target is there (appended to `kills`);
    a driver killed is followed by a `pisa study resume` (appended to `legs`)."""
    last = -MIN_GAP_S

    def now() -> float:
        return time.monotonic() - started

    for planned, target in schedule:
        pid = 0
        while not pid:
            code = legs[-1].ended()
            if code == 0:
                say(f"the study ended before the kill planned at {planned:.1f} s ({target})")
                break
            if code is not None:
                raise ChaosError(f"leg {legs[-1].index} exited {code} on its own:\n{legs[-1].group.tail()}")
            if time.monotonic() > deadline:
                raise ChaosError(f"no end in {deadline - started:.0f} s:\n{legs[-1].group.tail()}")
            if now() >= max(planned, last + MIN_GAP_S):
                pid = _kill(target, legs, work, ray, server)
            if not pid:
                time.sleep(0.1)
        if not pid:
            break
        last = now()
        kills.append(Kill(round(planned, 2), round(last, 2), target, pid, legs[-1].index))
        say(f"kill {len(kills)}/{len(schedule)} at {last:.1f} s (planned {planned:.1f} s): {target} {pid}")
        if target == "driver":
            legs.append(Leg(work, _resume_args(work, ray), len(legs)))
        elif target == "mlflow":
            time.sleep(pause.uniform(2, 6))
            server.start()
            say(f"mlflow server back at {now():.1f} s")


def _kill(target: str, legs: list[Leg], work: Path, ray: RayNode, server: MlflowServer) -> int:
    """SIGKILL `target` if it is there (0 if not, to try again)."""
    if target == "driver":
        if not _resumable(work):
            return 0
        pid = legs[-1].group.pid
        legs[-1].group.kill()
        return pid
    if target == "mlflow":
        return server.kill()
    pids = ray.actors(target)
    if not pids:
        return 0
    pid = pids[0]
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    return pid


def chaos(
    work: Path,
    *,
    plan: Plan = Plan(),
    kills: int = 10,
    seed: int = 0,
    timeout: float = 3600,
    say=print,
) -> Outcome:
    """Both runs in `work` (one Ray node, one MLflow server) and their comparison. The
    disturbed run may take `timeout` or 4x the undisturbed one and 5 minutes, the lesser: a
    run that does not end (a trial waiting for ever) is an outcome with its `error`."""
    from pisa.data import generate_synthetic

    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "shapes"
    if not (data_dir / "train.json").exists():
        generate_synthetic(data_dir, n_train=24, n_val=8, seed=0)
    (work / "mlflow").mkdir(exist_ok=True)
    server = MlflowServer(work / "mlflow")
    ray = None
    delivered: list[Kill] = []
    error, loud, legs = None, 0.0, 0
    differ: list[str] = []
    problems: dict[str, list[str]] = {}
    try:
        ray = RayNode(work)
        say(f"Ray node {ray.address}, MLflow server {server.uri}; {plan.trials} trials x {plan.epochs} epochs")
        quiet = undisturbed(work / "undisturbed", data_dir, server, ray, plan, timeout)
        say(f"undisturbed: {quiet:.1f} s")
        schedule = kill_schedule(seed, kills, (0.1 * quiet, 0.9 * quiet))
        limit = min(timeout, 4 * quiet + 300)
        try:
            loud, legs = disturbed(
                work / "killed", data_dir, server, ray, plan, schedule, seed, limit, delivered, say=say
            )
            say(f"killed {len(delivered)} times: {loud:.1f} s, {legs} pisa processes")
            reference = read_table(server.uri, "chaos-undisturbed", parent_run(work / "undisturbed"), plan)
            other = read_table(server.uri, "chaos-killed", parent_run(work / "killed"), plan)
            differ = differences(reference, other)
            problems = {"undisturbed": reference.problems, "killed": other.problems}
        except ChaosError as exc:
            error = str(exc)
            say(f"the disturbed run did not end well: {error[:4000]}")
    finally:
        if ray is not None:
            ray.stop()
        server.stop()
    return Outcome(
        seed=seed,
        plan=plan,
        kills=delivered,
        planned_kills=kills,
        wall_s={"undisturbed": round(quiet, 1), "killed": round(loud, 1)},
        legs=legs,
        differences=differ,
        problems=problems,
        error=error,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="kills in the disturbed run (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times and targets (default 0)")
    parser.add_argument("--trials", type=int, default=3, help="fixed points (default 3)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    parser.add_argument("--work", type=Path, help="keep everything here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the outcome here")
    args = parser.parse_args(argv)
    # `timeout`, a scheduler: the services started here are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pisa-chaos-")))
        outcome = chaos(work, plan=Plan(args.trials, args.epochs), kills=args.kills, seed=args.seed)
    result = outcome.to_dict()
    result["total_wall_s"] = round(time.monotonic() - started, 1)
    by_target = ", ".join(f"{n} {t}" for t, n in result["kills_by_target"].items())
    print(
        f"{len(outcome.kills)} kills ({by_target}; seed {outcome.seed}), {outcome.legs} pisa processes; "
        f"wall {outcome.wall_s['undisturbed']} s undisturbed, {outcome.wall_s['killed']} s killed, "
        f"{result['total_wall_s']} s in all"
    )
    for problem in [p for ps in outcome.problems.values() for p in ps] + outcome.differences:
        print(f"  {problem}")
    if outcome.error:
        print(f"  the disturbed run did not end: {outcome.error.splitlines()[0]}")
    print("tables equal" if outcome.equal else "TABLES DIFFER" if outcome.error is None else "NO TABLE")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if outcome.equal else 1


if __name__ == "__main__":
    sys.exit(main())
