"""What a study or a training needs from the Ray cluster it runs on, checked up front.

`--address HOST:PORT` joins a cluster as a driver on one of its nodes (this process runs
Tune, writes the study state and logs to MLflow). `--address ray://HOST:10001` is Ray
Client: this process only connects, and Tune (with the study's MLflow logger) and Ray
Train's controller run on the cluster's head. Whatever the head writes must then be
reachable from there too: a tracking *server*, not a SQLite file on this machine.
"""

from __future__ import annotations

from urllib.parse import urlparse

from . import storage
from .config import ConfigError

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
