"""pisa's local Ray node starts no workers its jobs cannot use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NODE = """
import time, psutil
from pisa.training.ray_runtime import init_ray
init_ray(verbose=False, dashboard=False, num_cpus=2)
time.sleep(4)  # Ray's first-driver workers are up within 1-2 s of its start
titles = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
print("idle workers:", sum(t.startswith("ray::IDLE") for t in titles))
"""


@pytest.mark.slow
def test_a_local_node_starts_no_idle_workers():
    """Ray starts a worker per CPU for the first driver, without a runtime environment; a pisa
    job has one, so those workers would only import Ray and be ended (with Ray's default, 2
    on this 2-CPU node: checked when this was written)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_prestart_worker_first_driver"}
    out = subprocess.run([sys.executable, "-c", NODE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "idle workers: 0" in out.stdout, out.stdout + out.stderr[-2000:]
