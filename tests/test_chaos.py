"""Chaos with an exact answer, short: benchmarks/chaos.py's study (fixed points, FIFO, every
trial a 2-worker Ray Train run) killed 4 times at seeded random times, once at each of a Ray
Train worker, the driver (then `pisa study resume`), a trial's process and the MLflow server,
ends with the undisturbed run's table: every per-epoch metric within 1e-6, one run per point,
every epoch logged once. The long version (10 kills) is the benchmark's default.

Seed 10 orders the kills worker, driver, trial, MLflow. Seed 0 (driver, worker, trial, MLflow)
kills a trial's process after one of its Ray Train workers within one driver's life: on Ray
2.60 that trial's worker group's placement group stays reserved and its restart waits for
ever on a 2-CPU node (benchmarks/RESULTS.md, "Chaos"), an open Ray issue this test does not
hold the product to."""

from __future__ import annotations

import pytest
from helpers import load_benchmark

chaos = load_benchmark("chaos")

pytestmark = pytest.mark.slow


def test_random_kills_change_nothing_in_the_final_table(tmp_path):
    outcome = chaos.chaos(tmp_path, plan=chaos.Plan(trials=2, epochs=2), kills=4, seed=10, timeout=600)
    result = outcome.to_dict()
    assert outcome.error is None, outcome.error
    assert len(outcome.kills) >= 3, result
    assert {k.target for k in outcome.kills} == set(chaos.TARGETS), result
    assert outcome.equal, result
