"""benchmarks/suite_cpu.py names processes by kind: Ray's by their titles, the rest by what
they run."""

from __future__ import annotations

import os

from helpers import load_benchmark

suite_cpu = load_benchmark("suite_cpu")


def test_processes_are_named_by_kind():
    assert suite_cpu.kind("ray::RayTrainWorker.train_fn") == "ray: RayTrainWorker"
    assert suite_cpu.kind("ray::IDLE") == "ray: IDLE"
    assert suite_cpu.kind("ray::ImplicitFunc.train ") == "ray: ImplicitFunc"
    assert suite_cpu.kind("/v/bin/python -m pisa.cli study run s.yaml") == "pisa driver (CLI)"
    assert suite_cpu.kind("/v/bin/python -m moto.server -H 127.0.0.1 -p 1") == "S3 server (moto)"
    assert suite_cpu.kind("/v/site-packages/ray/core/src/ray/gcs/gcs_server --x") == "ray: gcs_server"
    assert suite_cpu.kind("") == "kernel and other"


def test_cpu_is_summed_per_kind_most_first():
    tick = os.sysconf("SC_CLK_TCK")
    rows = suite_cpu.by_kind(
        [
            {"cmd": "ray::IDLE", "ticks": 2 * tick},
            {"cmd": "ray::RayTrainWorker.train_fn", "ticks": 5 * tick},
            {"cmd": "ray::RayTrainWorker", "ticks": 4 * tick},
        ]
    )
    assert rows == [("ray: RayTrainWorker", 9.0, 2), ("ray: IDLE", 2.0, 1)]
