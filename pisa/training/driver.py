"""What every command that drives Ray does before its work, in one order: the cluster set-up
checked against the tracking store and storage, the store reached, the libraries' chatter
quieted, and Ray started (or joined) while the data is prepared and the store set up — so
`pisa train`, `study run` and `resume`, `study validate` and `compare` fail alike, in one
line and before anything starts, and start alike.

A command opens its own MLflow run after `start` (a training's, a study's, a compare's); a
Ctrl-C or SIGTERM while it runs is the command's to record (`interrupted`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .. import tracking
from ..core.config import ExperimentConfig
from ..tracking import tags as tag
from ..tracking.tags import RunStatus, Status
from .cluster import check_cluster_setup
from .ray_runtime import init_ray_alongside, quiet_libraries

T = TypeVar("T")


class DriverSession:
    """Checks on construction (nothing started yet); `start` starts Ray with the data."""

    def __init__(self, uri: str, *, address: str | None, storage_path: str, source: str, verbose: bool = False):
        self.uri, self.address, self.verbose = uri, address, verbose
        if not verbose:
            quiet_libraries()
        self.notes = check_cluster_setup(address, uri, storage_path, source)
        tracking.check_reachable(uri)

    def start(self, cfg: ExperimentConfig, **init_kwargs: Any) -> int:
        """Ray started while `cfg`'s data is checked and prepared and the store set up; the
        number of classes. A missing data file fails before Ray starts."""
        from ..data import check_data_files  # torchvision, pycocotools: where the data is prepared

        check_data_files(cfg.data)

        def prepare() -> int:
            num_classes = prepare_data(cfg)
            tracking.tracker(self.uri)  # a new SQLite store creates its tables here
            return num_classes

        return self.start_with(prepare, **init_kwargs)

    def start_with(self, prepare: Callable[[], T], **init_kwargs: Any) -> T:
        """Ray started while `prepare` runs (several configs' data, or only the store)."""
        return init_ray_alongside(prepare, self.address, verbose=self.verbose, **init_kwargs)

    def interrupted(self, run_id: str) -> None:
        """Ctrl-C or SIGTERM: the command's run marked interrupted and KILLED, not left RUNNING."""
        tracker = tracking.tracker(self.uri)
        tracker.set_tags(run_id, {tag.STATUS: Status.INTERRUPTED})
        tracker.end_run(run_id, RunStatus.KILLED)


def prepare_data(cfg: ExperimentConfig) -> int:
    """Generate the synthetic set if asked, and validate the annotations once on the driver,
    so a corrupt file fails before any worker starts. Returns the number of classes."""
    return prepare_data_sizes(cfg)[0]


def prepare_data_sizes(cfg: ExperimentConfig) -> tuple[int, int]:
    """`prepare_data`, returning (classes, training images): what an epoch of it trains on."""
    from ..data import build_dataset, ensure_synthetic  # torchvision, pycocotools: where the data is prepared

    if cfg.data.synthetic is not None:
        ensure_synthetic(cfg.data.synthetic)
    train = build_dataset(cfg.data, "train", train=False)
    build_dataset(cfg.data, "val", train=False)
    return train.num_classes, len(train)
