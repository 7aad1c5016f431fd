"""How much a study's trials share: GPUs and CPUs assumed (`--gpus N`), this machine's (a
local Ray cluster), or a running Ray cluster's, with where the count came from (the plan prints it)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """What the trials share, and where that count came from."""

    gpus: float
    cpus: float
    where: str  # "4 GPUs (--gpus) ...", "this machine ...", "the Ray cluster at ..."

    def total(self, kind: str) -> float:
        return self.gpus if kind == "GPU" else self.cpus


def assumed_cluster(gpus: int) -> Cluster:
    """`--gpus N`: N GPUs and this machine's CPUs, without asking Ray."""
    cpus = os.cpu_count() or 1
    return Cluster(float(gpus), float(cpus), f"{gpus} GPU(s) (--gpus) and this machine's {cpus} CPUs")


def local_cluster() -> Cluster:
    """What the local Ray cluster `pisa study run` starts would hold: this machine's CPUs and
    visible GPUs (no Ray is started to count them)."""
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    return Cluster(float(gpus), float(cpus), f"this machine ({cpus} CPUs, {gpus} GPUs; a local Ray cluster)")


def ray_cluster(address: str | None = None) -> Cluster:
    """The running Ray cluster's totals (joined first when `address` is given)."""
    import ray

    if not ray.is_initialized():
        from ..training.ray_runtime import init_ray

        init_ray(address, verbose=False, dashboard=False)
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 0))
    where = f"the Ray cluster at {address}" if address else "the Ray cluster"
    return Cluster(gpus, cpus, f"{where} ({cpus:g} CPUs, {gpus:g} GPUs)")
