"""One training's MLflow run, written the same way wherever the training runs: `pisa train`
(the driver, and the Ray Train controller for its epochs), a study's trial and a training of
a grid (both from the Tune driver's callbacks).

A `TrainingRun` creates the run (the config's params, a kind and tags, nested under a parent
if given), logs the config (`config.yaml`) and the dataset inputs, samples the machine into
`system/*` while the training runs, logs each epoch's report once at step = epoch, uploads a
checkpoint directory (`checkpoint/`) and ends the run with its status. It holds the run's id
and store URI only (plus, in the process that started it, the system-metrics sampler), so
it travels to the Ray Train controller and through Tune's pickles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.checkpoint import CHECKPOINT_FILE, checkpoint_files
from .lineage import SystemMetrics
from .store import Tracker, tracker
from .tags import ERROR, KIND, STATUS, Kind, RunStatus, Status

if TYPE_CHECKING:
    from ..core.config import ExperimentConfig

CONFIG_ARTIFACT = "config.yaml"  # the training config, as YAML (what `pisa reproduce RUN_ID` reads)
CHECKPOINT_ARTIFACT = "checkpoint"  # the folder of a run's checkpoint files


class TrainingRun:
    """The MLflow run of one training, by id: see the module docstring.

    `logged_epoch` is the last epoch logged to it: an epoch reported again (a training that
    continues from an older checkpoint trains it again) is not logged twice."""

    def __init__(self, uri: str, run_id: str, logged_epoch: int = 0) -> None:
        self.uri = uri
        self.run_id = run_id
        self.logged_epoch = logged_epoch
        self._monitor: SystemMetrics | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The sampler stays in the process that started it (a thread is not pickled)."""
        return {**self.__dict__, "_monitor": None}

    def __repr__(self) -> str:
        return f"TrainingRun({self.run_id!r}, logged_epoch={self.logged_epoch})"

    @property
    def tracker(self) -> Tracker:
        """Looked up, not held: the process's one `Tracker` of the store."""
        return tracker(self.uri)

    @classmethod
    def start(
        cls,
        uri: str,
        cfg: ExperimentConfig,
        name: str,
        *,
        kind: Kind | None = None,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> TrainingRun:
        """A new run named `name` in the config's experiment, with the config's params (and
        `params`), the tag `pisa.kind` = `kind` and `tags` (which may name another kind),
        nested under `parent_run_id` if given. Its config is logged by `log_config`."""
        run_tags: dict[str, str] = {KIND: kind} if kind is not None else {}
        run_tags.update(tags or {})
        run_id = tracker(uri).start_run(
            cfg.tracking.experiment,
            name,
            params={**cfg.flat_params(), **(params or {})},
            tags=run_tags,
            parent_run_id=parent_run_id,
        )
        return cls(uri, run_id)

    def log_config(self, cfg: ExperimentConfig) -> None:
        """The training config as `config.yaml`, its annotation files as dataset inputs."""
        self.tracker.log_text(self.run_id, cfg.to_yaml(), CONFIG_ARTIFACT)
        self.tracker.log_datasets(self.run_id, cfg.data)

    def reopen(self, *, status_tag: bool) -> None:
        """RUNNING again in MLflow (a retried or resumed training). With `status_tag` (a
        study's trial) its `pisa.status` says running again and a failed try's error goes."""
        t = self.tracker
        if status_tag:
            tags = t.run(self.run_id).data.tags
            if ERROR in tags:  # a failed trial, retried
                t.delete_tag(self.run_id, ERROR)
            if tags.get(STATUS) != Status.RUNNING:  # retried, or resumed after an interruption
                t.set_tags(self.run_id, {STATUS: Status.RUNNING})
        t.update_status(self.run_id, RunStatus.RUNNING)

    def start_system_metrics(self, interval_s: float | None, *, resume: bool = False) -> None:
        """Sample this machine into the run's `system/*` metrics every `interval_s` seconds
        (none for 0 or None) until `stop_system_metrics`; `resume` continues their steps."""
        self.stop_system_metrics()
        self._monitor = SystemMetrics(self.uri, self.run_id, float(interval_s or 0), resume=resume)

    def stop_system_metrics(self) -> None:
        monitor, self._monitor = getattr(self, "_monitor", None), None
        if monitor is not None:
            monitor.stop()

    def log_epoch(self, metrics: Mapping[str, Any], epoch: int) -> bool:
        """Log an epoch's numeric metrics at step `epoch`, unless that epoch (or a later one)
        is logged already; whether they were logged."""
        if epoch <= self.logged_epoch:
            return False
        self.tracker.log_metrics(self.run_id, metrics, step=epoch)
        self.logged_epoch = epoch
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def log_files(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Log each file or folder of `paths` that exists under `artifact_path`."""
        self.tracker.log_artifacts(self.run_id, paths, artifact_path)

    def log_checkpoint(self, directory: str | Path) -> bool:
        """Upload a local checkpoint directory's files (`pisa.core.checkpoint.checkpoint_files`)
        as the run's `checkpoint/` artifact; whether it held a checkpoint to upload."""
        if not (Path(directory) / CHECKPOINT_FILE).exists():
            return False
        self.log_files(checkpoint_files(directory), CHECKPOINT_ARTIFACT)
        return True

    def end(
        self,
        state: RunStatus = RunStatus.FINISHED,
        *,
        status: Status | None = None,
        error: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Stop the system metrics, set `tags`, `pisa.status` = `status` and `pisa.error` =
        `error` (those given), and end the run in MLflow's `state`."""
        self.stop_system_metrics()
        end_tags = dict(tags or {})
        if status is not None:
            end_tags[STATUS] = status
        if error is not None:
            end_tags[ERROR] = error
        if end_tags:
            self.set_tags(end_tags)
        self.tracker.end_run(self.run_id, str(state))
