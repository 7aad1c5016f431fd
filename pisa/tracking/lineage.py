"""Where a run came from: code, user, library versions, datasets, and the machine's load.

Runs are created with `MlflowClient` (one writer per store), which sets none of the
context tags MLflow's fluent API adds; `lineage_tags` resolves the same ones through
MLflow's own context providers, so the runs table's Source and User columns fill.
`dataset_inputs` are the train/val annotation files as dataset inputs (the Dataset column,
logged by `Tracker.log_datasets`); `SystemMetrics` samples CPU, memory, disk, network and
(with nvidia-ml-py on a GPU machine) GPU use into the run's `system/*` metrics.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .tags import VERSION_PREFIX

log = logging.getLogger(__name__)

DIGEST_CHARS = 16  # MLflow's dataset digest column holds 36
SYSTEM_METRICS_INTERVAL_S = 10.0


def library_versions() -> dict[str, str]:
    """pisa, torch, torchvision, Ray, MLflow and Optuna versions as `pisa.version.*` tags; the
    module's own `__version__`, so torch's carries its build (`2.14.1+cu130`)."""
    import importlib

    out = {f"{VERSION_PREFIX}pisa": __version__}
    for name in ("torch", "torchvision", "ray", "mlflow", "optuna"):
        try:
            out[f"{VERSION_PREFIX}{name}"] = str(importlib.import_module(name).__version__)
        except ImportError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def _context_tags() -> dict[str, str]:
    from .mlflow_private import context_tags

    try:
        tags = context_tags()
    except Exception as exc:  # a context provider must never cost a run
        log.warning("MLflow run context not resolved: %s", exc)
        tags = {}
    # the code that trains is this package: its checkout's commit, wherever the entry point lives
    commit = _git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return {k: str(v) for k, v in tags.items()}


def _git_commit(path: Path) -> str | None:
    """The commit of the checkout holding `path` (the pisa package), if it is one."""
    import subprocess

    try:
        proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def lineage_tags() -> dict[str, str]:
    """mlflow.source.name/type, mlflow.source.git.commit, mlflow.user and library versions."""
    return {**_context_tags(), **library_versions()}


# ---------------------------------------------------------------- dataset inputs


@dataclass(frozen=True)
class DatasetSummary:
    """What the Dataset column shows for one annotation file."""

    name: str
    source: str
    digest: str
    num_images: int
    num_images_in_file: int
    num_annotations: int
    num_classes: int

    def profile(self) -> str:
        return json.dumps(
            {
                "num_images": self.num_images,
                "num_images_in_file": self.num_images_in_file,
                "num_annotations": self.num_annotations,
                "num_classes": self.num_classes,
            }
        )


@functools.lru_cache(maxsize=32)
def _annotation_stats(path: str, mtime_ns: int) -> tuple[str, int, int, int, list[int]]:
    """(digest, images, annotations, classes, sorted image ids); cached per file version."""
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]
    data = json.loads(raw)
    return (
        digest,
        len(data.get("images", [])),
        len(data.get("annotations", [])),
        len(data.get("categories", [])),
        sorted(int(i["id"]) for i in data.get("images", [])),
    )


def summarize_dataset(annotations: Path, images: Path, split: str, limit: int | None) -> DatasetSummary:
    path = Path(annotations).resolve()
    digest, n_images, n_anns, n_classes, _ = _annotation_stats(str(path), path.stat().st_mtime_ns)
    used = min(n_images, limit) if limit else n_images
    if used != n_images:  # a subset is another dataset: the digest says which
        digest = hashlib.sha256(f"{digest}:first{used}".encode()).hexdigest()[:DIGEST_CHARS]
    name = f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem
    return DatasetSummary(
        name=name,
        source=str(path),
        digest=digest,
        num_images=used,
        num_images_in_file=n_images,
        num_annotations=n_anns,
        num_classes=n_classes,
    )


def dataset_inputs(data_cfg) -> tuple[list[DatasetSummary], list]:
    """The train and val annotation files of a `DataConfig` that exist, as MLflow dataset
    inputs of a run (`Tracker.log_datasets` logs them), with their summaries."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    summaries, inputs = [], []
    for split in ("train", "val"):
        ann = Path(getattr(data_cfg, f"{split}_annotations"))
        if not ann.exists():
            continue
        s = summarize_dataset(
            ann, Path(getattr(data_cfg, f"{split}_images")), split, getattr(data_cfg, f"{split}_limit")
        )
        summaries.append(s)
        entity = Dataset(
            name=s.name, digest=s.digest, source_type="local", source=json.dumps({"uri": s.source}), profile=s.profile()
        )
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", split)]))
    return summaries, inputs


# ---------------------------------------------------------------- system metrics


class SystemMetrics:
    """MLflow's system-metrics sampler for one run, started and stopped by the driver.

    It samples the machine it runs on every `interval` seconds (a daemon thread; `stop`
    wakes it at once); without a GPU or nvidia-ml-py the GPU part is simply left out.
    """

    def __init__(self, uri: str, run_id: str, interval: float = SYSTEM_METRICS_INTERVAL_S, resume: bool = False):
        self.monitor = None
        if interval <= 0:
            return
        try:
            from .mlflow_private import system_metrics_monitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
            self.monitor = system_metrics_monitor(
                run_id, sampling_interval=interval, samples_before_logging=1, resume_logging=resume, tracking_uri=uri
            )
            self.monitor.start()
        except Exception as exc:  # psutil missing, odd platform: the run goes on without
            log.warning("system metrics off for run %s: %s", run_id, exc)
            self.monitor = None

    def stop(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()  # wakes the sampler at once, flushes what it holds
            except Exception as exc:  # pragma: no cover
                log.warning("system metrics not flushed: %s", exc)
            self.monitor = None
