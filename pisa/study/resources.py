"""What a study's trials hold on the Ray cluster, and how many of them run at once."""

from __future__ import annotations

from ..core.errors import ConfigError
from ..core.progress import say
from ..training.cluster import check_fits, worker_resources
from ..training.ray_runtime import DRIVER_RESOURCE
from .loading import Study
from .trial import trains_in_trial


def trial_driver_resources() -> dict[str, float]:
    """The trainable only drives its TorchTrainer and must not hold a core the workers need.

    Tune refuses an empty request: on a local cluster it takes a slot of a custom resource
    that `init_ray` declares; on a user's cluster a sliver of a CPU.
    """
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) >= 1:
        return {DRIVER_RESOURCE: 1}
    return {"CPU": 0.01}


def trial_resources(study: Study, in_trial: bool | None = None) -> dict[str, float]:
    """A trial that trains in its own process holds its worker's CPUs (and GPU) itself."""
    if not (trains_in_trial(study) if in_trial is None else in_trial):
        return trial_driver_resources()
    res = study.cfg.resources_per_trial
    return {
        "CPU": res.cpus_per_worker,
        **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {}),
        **res.resources_per_worker,
    }


def check_trial_fits(study: Study, address: str | None) -> None:
    """One trial's training must fit the cluster, or the study would wait forever."""
    exp = study.base_config  # its train.* are the study's resources_per_trial (see loading)
    waiting = check_fits(
        exp.train.workers,
        worker_resources(exp),
        address,
        f"{study.source}: resources_per_trial",
        hint="on CPUs: gpus_per_worker: 0; fewer workers: workers: N",
    )
    if waiting:
        say(waiting)


def training_footprint(study: Study) -> tuple[str, float]:
    """What one training of this study holds: ("GPU", GPUs) or ("CPU", CPUs), all workers."""
    res = study.cfg.resources_per_trial
    if res.gpus_per_worker > 0:
        return "GPU", res.workers * res.gpus_per_worker
    return "CPU", res.workers * res.cpus_per_worker


def trainings_that_fit(study: Study) -> int:
    """How many of this study's trainings the Ray cluster holds at once (0 if not one)."""
    import ray

    kind, per_training = training_footprint(study)
    return int(ray.cluster_resources().get(kind, 0) // max(per_training, 1e-9))


def concurrent_trials(study: Study) -> int:
    """How many trials run at once. A point with N seeds trains N runs side by side, so
    fewer points fit the cluster at a time; a point that cannot fit at all is an error
    (its seeds would wait for each other forever)."""
    cfg = study.cfg
    if cfg.seeds == 1:
        return cfg.max_concurrent_trials
    kind, per_training = training_footprint(study)
    fit = trainings_that_fit(study)
    if fit < cfg.seeds:
        raise ConfigError(
            f"{study.source}: seeds: {cfg.seeds} seeds x {cfg.resources_per_trial.workers} worker(s) train at "
            f"once and need {cfg.seeds * per_training:g} {kind}s; the Ray cluster has {fit * per_training:g}"
        )
    fits = min(cfg.max_concurrent_trials, fit // cfg.seeds)
    if fits < cfg.max_concurrent_trials:
        say(
            f"{fits} trial(s) at a time, not {cfg.max_concurrent_trials}: each trains {cfg.seeds} seeds "
            f"at once ({cfg.seeds * per_training:g} {kind}s) and the cluster fits {fit} trainings"
        )
    return fits
