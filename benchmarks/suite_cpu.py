"""Where a command's CPU goes, by kind of process: the test suite's, by default.

The suite is CPU-bound on 2 cores and most of its CPU is spent outside pytest's own
processes (Ray's daemons and workers, trial processes, `pisa` drivers, MLflow and S3
servers), which `time` does not see once they are re-parented. This samples every process
of the machine every `--interval` seconds (`/proc/PID/stat`: user + system ticks, the
latest command line, as Ray's `setproctitle` names them), runs the command, and prints the
CPU-seconds per kind with the machine's busy CPU-seconds over the run (`/proc/stat`).
A process shorter than the interval is missed: the total sampled is a lower bound.

    python benchmarks/suite_cpu.py                                   # make test, 2 s samples
    python benchmarks/suite_cpu.py --json cpu.json -- make test PYTEST_ARGS="-q -p no:cacheprovider"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_COMMAND = ["make", "test", "PYTEST_ARGS=-q --durations=0 -p no:cacheprovider"]

# (a piece of the command line, the kind it names), first match wins
KINDS = [
    ("gcs_server", "ray: gcs_server"),
    ("raylet", "ray: raylet"),
    ("dashboard/agent.py", "ray: dashboard agent"),
    ("dashboard/dashboard.py", "ray: dashboard"),
    ("ray-dashboard-", "ray: dashboard"),
    ("runtime_env/agent", "ray: runtime env agent"),
    ("log_monitor", "ray: log monitor"),
    ("autoscaler/_private/monitor", "ray: autoscaler monitor"),
    ("ray.util.client.server", "ray: client server"),
    ("bin/ray start", "ray: ray start"),
    ("default_worker.py", "ray: worker (untitled)"),
    ("setup_worker", "ray: worker setup"),
    ("-m pisa.cli", "pisa driver (CLI)"),
    ("xdist", "pytest worker"),
    ("pytest", "pytest"),
    ("moto.server", "S3 server (moto)"),
    ("mlflow", "MLflow server"),
    ("postgres", "PostgreSQL"),
    ("multiprocessing", "multiprocessing child"),
    ("ruff", "lint"),
    ("mypy", "lint"),
    ("lint-imports", "lint"),
    ("python", "other Python"),
]


def kind(cmdline: str) -> str:
    """The kind of a process from its command line: a Ray actor or task by its title
    (`ray::RayTrainWorker`, `ray::IDLE`), else by what it runs."""
    if cmdline.startswith("ray::"):
        title = cmdline.split()[0]
        return "ray: " + re.sub(r"\.[A-Za-z_]\w*$", "", title[len("ray::") :])  # Class.method -> Class
    for piece, name in KINDS:
        if piece in cmdline:
            return name
    return "kernel and other" if not cmdline else cmdline.split()[0].rsplit("/", 1)[-1][:40]


def _busy_ticks() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(v for i, v in enumerate(fields[:8]) if i not in (3, 4))  # all but idle and iowait


class Sampler(threading.Thread):
    """Every process's CPU ticks and latest command line, every `interval` s, until stopped."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.seen: dict[str, dict] = {}  # "pid:start time" -> {cmd, ticks}
        self.done = threading.Event()

    def sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                rest = stat[stat.rindex(")") + 2 :].split()
                ticks, start = int(rest[11]) + int(rest[12]), rest[19]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            entry = self.seen.setdefault(f"{pid}:{start}", {"cmd": cmd, "ticks": 0})
            entry["ticks"] = ticks
            if cmd.strip():
                entry["cmd"] = cmd.strip()[:300]

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()


def by_kind(processes: list[dict]) -> list[tuple[str, float, int]]:
    """(kind, CPU-seconds, processes), most CPU first."""
    cpu: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for p in processes:
        k = kind(p["cmd"])
        cpu[k] += p["ticks"] / TICKS
        count[k] += 1
    return sorted(((k, cpu[k], count[k]) for k in cpu), key=lambda row: -row[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--json", type=Path, help="write every process seen and the totals here")
    parser.add_argument("--top", type=int, default=30, help="kinds to print (default 30)")
    parser.add_argument("command", nargs="*", help="the command (default: make test with durations)")
    args = parser.parse_args(argv)
    command = args.command or DEFAULT_COMMAND
    sampler = Sampler(args.interval)
    sampler.sample()
    before = {key: dict(entry) for key, entry in sampler.seen.items()}  # what ran already is not the command's
    busy0, started = _busy_ticks(), time.monotonic()
    sampler.start()
    code = subprocess.call(command)
    sampler.stop()
    wall, busy = time.monotonic() - started, (_busy_ticks() - busy0) / TICKS
    processes = [
        {**entry, "ticks": entry["ticks"] - before.get(key, {"ticks": 0})["ticks"]}
        for key, entry in sampler.seen.items()
    ]
    rows = by_kind(processes)
    print(f"\n{' '.join(command)}: exit {code}, {wall / 60:.1f} min wall, {busy:.0f} CPU-s busy on the machine")
    for name, seconds, n in rows[: args.top]:
        print(f"{seconds:8.1f} CPU-s {n:5d} processes {seconds / n:6.1f} each  {name}")
    print(f"{sum(s for _, s, _ in rows):8.1f} CPU-s sampled in all")
    if args.json:
        totals = {"command": command, "exit": code, "wall_s": wall, "busy_cpu_s": busy, "by_kind": rows}
        args.json.write_text(json.dumps({**totals, "processes": processes}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
