"""How many trainings run side by side, decided once: a frozen `Capacity` the study, a
compare, a validation and the cost plan all read, instead of each counting on its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..core.config import TrainConfig
from ..core.errors import ConfigError
from ..training.cluster import worker_resources_of
from ..training.ray_runtime import DRIVER_RESOURCE


@dataclass(frozen=True)
class Capacity:
    """`at_once` units (a point's seeds, or one training) side by side; `note` says why fewer
    than asked run, "" when the limit stood."""

    at_once: int
    note: str = ""


def footprint(train: TrainConfig) -> tuple[str, float]:
    """What one training holds: ("GPU", GPUs) or ("CPU", CPUs), all its workers."""
    if train.use_gpu:
        return "GPU", train.workers * train.gpus_per_worker
    return "CPU", train.workers * train.cpus_per_worker


def trainings_that_fit(train: TrainConfig, totals: Mapping[str, float]) -> int:
    """How many trainings of this layout `totals` (a cluster's resources) hold at once, counted
    in what a training is priced in (its GPUs, or its CPUs when it trains on CPUs)."""
    kind, per_training = footprint(train)
    return int(totals.get(kind, 0.0) // max(per_training, 1e-9))


def resolve(
    train: TrainConfig,
    totals: Mapping[str, float],
    *,
    limit: int,
    group: int = 1,
    source: str = "",
    queue: bool = False,
) -> Capacity:
    """The capacity for trainings of `train`'s layout, in units of `group` that must run
    together (a point's seeds), at most `limit` units. `queue`: single trainings may wait for
    resources (Tune queues trials; a joined cluster may grow), so `limit` stands as given.
    A group the resources can never hold is an error (its trainings would wait for each
    other forever); one training that does not fit yet runs alone (it waits for resources)."""
    kind, per_training = footprint(train)
    fit = trainings_that_fit(train, totals)
    if group == 1 and queue:
        return Capacity(limit)
    if group > 1 and fit < group:
        raise ConfigError(
            f"{source}: {group} seeds x {train.workers} worker(s) train at once and need "
            f"{group * per_training:g} {kind}s; the Ray cluster has {fit * per_training:g}"
        )
    at_once = max(1, min(limit, fit // group))
    note = ""
    if at_once < limit and group > 1:
        note = (
            f"{at_once} trial(s) at a time, not {limit}: each trains {group} seeds "
            f"at once ({group * per_training:g} {kind}s) and the cluster fits {fit} trainings"
        )
    return Capacity(at_once, note)


def cluster_totals() -> dict[str, float]:
    """The resources of the Ray cluster this driver is connected to."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def trial_driver_resources() -> dict[str, float]:
    """The trainable only drives its TorchTrainer and must not hold a core the workers need.

    Tune refuses an empty request: on a local cluster it takes a slot of a custom resource
    that `init_ray` declares; on a user's cluster a sliver of a CPU.
    """
    if cluster_totals().get(DRIVER_RESOURCE, 0) >= 1:
        return {DRIVER_RESOURCE: 1}
    return {"CPU": 0.01}


def trial_resources(train: TrainConfig, in_trial: bool) -> dict[str, float]:
    """A trial that trains in its own process holds its worker's CPUs (and GPU) itself."""
    if not in_trial:
        return trial_driver_resources()
    return worker_resources_of(train)
