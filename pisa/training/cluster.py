"""What a study or a training needs from the Ray cluster it runs on, checked up front.

`--address HOST:PORT` joins a cluster as a driver on one of its nodes (this process runs
Tune, writes the study state and logs to MLflow). `--address ray://HOST:10001` is Ray
Client: this process only connects, and Tune (with the study's MLflow logger) and Ray
Train's controller run on the cluster's head. Whatever the head writes must then be
reachable from there too: a tracking *server*, not a SQLite file on this machine.
"""

from __future__ import annotations

from urllib.parse import urlparse

from ..core import storage
from ..core.config import ExperimentConfig, TrainConfig
from ..core.errors import ConfigError

LOCAL_TRACKING_SCHEMES = ("sqlite", "file", "")


def is_client(address: str | None) -> bool:
    return bool(address) and str(address).startswith("ray://")


def check_cluster_setup(address: str | None, tracking_uri: str, storage_path: str, source: str) -> list[str]:
    """Fail before anything starts when the set-up can't work on `address`; return notes."""
    if not is_client(address):
        return []
    scheme = urlparse(tracking_uri).scheme.split("+")[0]
    if scheme in LOCAL_TRACKING_SCHEMES or len(scheme) == 1:  # a Windows drive letter is a path
        raise ConfigError(
            f"{source}: tracking.uri: {tracking_uri} is a file on this machine, but through "
            f"{address} (Ray Client) the study is logged from the cluster's head: use a tracking "
            f"server reachable from the cluster (tracking.uri=http://HOST:5000, see docker/README.md)"
        )
    notes = []
    if not storage.is_remote(storage_path):
        notes.append(
            f"storage_path {storage_path} is local: through {address} it must be a directory "
            f"that this machine and every node share (or use s3://, gs://)"
        )
    return notes


def worker_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one worker of `cfg` asks Ray for (`worker_resources_of`)."""
    return worker_resources_of(cfg.train)


def worker_resources_of(train: TrainConfig) -> dict[str, float]:
    """What one worker asks Ray for: its CPUs, (a fraction of) a GPU, any custom resources."""
    resources: dict[str, float] = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    resources.update(train.resources_per_worker)
    return resources


def check_training_fits(train: TrainConfig, address: str | None, source: str, hint: str) -> str | None:
    """`check_fits` for one training of `train`'s layout: its workers, each with its resources."""
    return check_fits(train.workers, worker_resources_of(train), address, source, hint=hint)


def _fmt(resources: dict[str, float], zeros: bool = False) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if v or zeros) or "nothing"


def check_fits(
    workers: int, per_worker: dict[str, float], address: str | None, source: str, hint: str = ""
) -> str | None:
    """Fail in one line when the Ray cluster cannot hold `workers` bundles of `per_worker`:
    on a cluster pisa started itself nothing will ever add the missing resources, and Ray
    would wait forever. On a joined cluster (`--address`) an autoscaler may add nodes: the
    returned line says what the training waits for. None when it fits now."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            total[k] = total.get(k, 0.0) + float(v)
    wanted = {k: v for k, v in per_worker.items() if v}
    need = {k: v * workers for k, v in wanted.items()}
    one_fits = any(all(node.get(k, 0.0) >= v for k, v in wanted.items()) for node in nodes)
    enough_in_all = all(total.get(k, 0.0) >= v for k, v in need.items())
    if one_fits and enough_in_all:
        return None
    shown = {k: total.get(k, 0.0) for k in need}
    what = f"{workers} worker(s) x {_fmt(wanted)} = {_fmt(need)}; the Ray cluster has {_fmt(shown, zeros=True)}"
    if not one_fits and enough_in_all:
        what += " but no node holds one worker's share"
    if address is None:
        raise ConfigError(f"{source}: the training needs {what}{f' ({hint})' if hint else ''}")
    return (
        f"waiting for the cluster at {address} to provide {_fmt(need)} "
        f"(it has {_fmt(shown, zeros=True)}; an autoscaler may add nodes)"
    )
