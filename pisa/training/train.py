"""`pisa train`: one training as a Ray Train `TorchTrainer`, tracked in MLflow.

The driver validates everything that can fail fast (config, dataset, tracking store)
before Ray starts; the Ray Train controller then logs each epoch's metrics to the MLflow
run as they arrive (one writer), and the driver logs the final checkpoint and plots.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import storage
from ..core.checkpoint import check_checkpoint
from ..core.config import ExperimentConfig
from ..core.errors import one_line
from ..core.progress import say
from ..core.storage import location_of
from ..core.uris import redact
from ..tracking.run_writer import TrainingRun
from ..tracking.tags import Kind, RunStatus, Status
from . import signals
from .cluster import check_training_fits, worker_resources
from .device_plan import process_group_backend
from .driver import DriverSession
from .engine import DIAGNOSTICS_FILE, stopped_on, train_loop_per_worker
from .ray_runtime import forward_only_worker_output


@dataclass
class TrainOutcome:
    run_id: str | None
    status: str  # a `RunStatus`: FINISHED | FAILED
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """What `pisa train` prints last: the run, its status, final metrics and error."""
        return json.dumps(
            {"run_id": self.run_id, "status": self.status, "metrics": self.metrics, "error": self.error},
            indent=2,
            default=str,
        )


def scaling_config(cfg: ExperimentConfig):
    """Workers with the CPUs and (fractions of) GPUs each one asks for."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker=worker_resources(cfg)
    )


def build_trainer(
    cfg: ExperimentConfig,
    *,
    name: str,
    callbacks=(),
    resume_from: str | None = None,
    faults: dict[str, Any] | None = None,
    checkpoint_score: tuple[str, str] | None = ("bbox_mAP", "max"),
    verbose: bool = False,
):
    """The `TorchTrainer` of one training: gloo on CPU; NCCL for CUDA tensors plus gloo for
    the CPU collectives on GPU (`pisa.training.device_plan.process_group_backend`). Ray keeps the
    `keep_checkpoints` best by `checkpoint_score` (metric, mode) and always the latest,
    which a restart resumes from. Not `verbose`: Ray Train's INFO lines stay in its log files."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    loop_config: dict[str, Any] = {"experiment": cfg.model_dump(mode="json"), "quiet": not verbose}
    if resume_from:
        loop_config["resume_from"] = str(resume_from)
    if faults:
        loop_config["faults"] = dict(faults)  # test-only fault injection (nan_at, kill_at)
    return TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]  # Ray Train keeps rank 0's return value
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=process_group_backend(cfg.train.use_gpu)),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(  # type: ignore[call-arg]  # Ray Train v2's RunConfig (RAY_TRAIN_V2_ENABLED)
            name=name,
            storage_path=str(cfg.storage_path),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=checkpoint_score[0] if checkpoint_score else None,
                checkpoint_score_order=checkpoint_score[1] if checkpoint_score else "max",
            ),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )


def _mlflow_callback(run: TrainingRun):
    """A Ray Train callback (runs in the controller) logging each epoch to the MLflow run."""
    from ray.train import UserCallback

    class MlflowEpochLogger(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics:
                return
            m = metrics[0]
            run.log_epoch(m, int(m.get("epoch", 0)))

    return MlflowEpochLogger()


def log_final_artifacts(run: TrainingRun, checkpoint_dir: str | None, log_checkpoint: bool) -> None:
    """The PISA weights' histograms of a training's final checkpoint (`plots/`) and, if
    `log_checkpoint`, the checkpoint itself (`checkpoint/`)."""
    if not checkpoint_dir:
        return
    with storage.local_copy(checkpoint_dir) as ckpt, tempfile.TemporaryDirectory(prefix="pisa-art-") as tmp:
        png = diagnostics_plot(ckpt / DIAGNOSTICS_FILE, Path(tmp) / "pisa_weights.png")
        if png is not None:
            run.log_files([png], "plots")
        if log_checkpoint:
            run.log_checkpoint(ckpt)


def run_training(
    cfg: ExperimentConfig,
    *,
    address: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    resume_from: str | None = None,
    faults: dict[str, Any] | None = None,
    verbose: bool = False,
    source: str = "config",
) -> TrainOutcome:
    """Train one config end to end and track it in MLflow; never raises for a failed fit.
    The console shows pisa's progress lines; `verbose` adds Ray's own. `source` names the
    config in errors (its file); `tags` are the run's (they may name another `pisa.kind`)."""
    if resume_from:  # here, not in a worker: another working directory, and a retry reads it again
        resume_from = str(check_checkpoint(resume_from))
    uri = cfg.tracking.resolved_uri()
    driver = DriverSession(uri, address=address, storage_path=cfg.storage_path, source=source, verbose=verbose)
    # the workers' progress lines reach the console (forwarded by Ray), Ray's own INFO does not
    num_classes = driver.start(cfg, log_to_driver=True)
    waiting = check_training_fits(cfg.train, address, source, hint="on CPUs: --cpu; fewer workers: --workers N")
    if waiting:
        say(waiting)
    if not verbose:  # the workers' progress lines, not Ray's own (they are in its session logs)
        forward_only_worker_output()
    name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # the tracking store was set up beside Ray's start: no wait here
    run = TrainingRun.start(uri, cfg, name, kind=Kind.TRAIN, tags=tags, params={"data.num_classes": num_classes})
    try:
        return _fit_tracked(cfg, run, name, resume_from, faults, verbose)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run is not left RUNNING
        run.end(RunStatus.KILLED, status=Status.INTERRUPTED)
        say(f"training interrupted; MLflow run {run.run_id} marked KILLED")
        raise


def _fit_tracked(
    cfg: ExperimentConfig,
    run: TrainingRun,
    name: str,
    resume_from: str | None,
    faults: dict[str, Any] | None,
    verbose: bool,
) -> TrainOutcome:
    """The part of `run_training` that runs with its MLflow run open."""
    run.log_config(cfg)
    say(f"MLflow run {run.run_id} in {redact(run.uri)}")
    trainer = build_trainer(
        cfg,
        name=name,
        callbacks=[_mlflow_callback(run)],
        resume_from=resume_from,
        faults=faults,
        verbose=verbose,
    )
    run.start_system_metrics(cfg.tracking.system_metrics_interval_s)
    try:
        with signals.interrupting_at_once():  # SIGTERM: the caller marks the run, Ray stops with us
            result = trainer.fit()
        error = getattr(result, "error", None) or stopped_on(result)
    except Exception as exc:  # TrainingFailedError and friends
        result, error = None, exc
    finally:
        run.stop_system_metrics()
    checkpoint_dir = (
        location_of(result.checkpoint.path, cfg.storage_path) if result is not None and result.checkpoint else None
    )
    metrics = dict(result.metrics or {}) if result is not None else {}
    if error is not None:
        message = one_line(error)
        run.end(RunStatus.FAILED, error=message)
        say(f"training failed: {message}")
        return TrainOutcome(run.run_id, str(RunStatus.FAILED), metrics, checkpoint_dir, message)
    log_final_artifacts(run, checkpoint_dir, cfg.tracking.log_checkpoint)
    run.end(RunStatus.FINISHED)
    return TrainOutcome(run.run_id, str(RunStatus.FINISHED), metrics, checkpoint_dir)


def diagnostics_plot(diag_file: Path, out_png: Path) -> Path | None:
    """Histograms of the last epoch's PISA weights (ISR-P, ISR-N, CARL)."""
    import torch

    if not diag_file.exists():
        return None
    data = torch.load(diag_file, map_location="cpu", weights_only=True)
    keys = [k for k, v in data.items() if v.numel() > 0]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.hist(data[k].numpy(), bins=50, color="#3572b0")
        ax.set_title(k)
        ax.set_xlabel("value")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
