"""A training's rate (images per second, all workers) for the study plan: from an earlier run
of the same model and layout in the MLflow store, or from a probe of a few steps on this machine."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass

from .workload import Workload

# The logged params that decide how fast a step is: an earlier run's `images_per_sec` prices
# this study's trials only if it trained the same model on the same layout (keys the study
# searches are left out: its trials differ there anyway)
RATE_KEYS = (
    "model.detector",
    "model.backbone",
    "model.norm",
    "model.min_size",
    "model.max_size",
    "model.fpn_channels",
    "model.box_head_width",
    "model.rpn_post_nms_top_n_train",
    "model.rois_per_image",
    "model.sampler",
    "train.images_per_worker",
    "train.workers",
    "train.use_gpu",
)
RATE_METRIC = "images_per_sec"  # per epoch, over all of a training's workers (engine)
EVAL_METRIC = "time_eval_s"


@dataclass(frozen=True)
class Rate:
    """One training's throughput (all its workers), and where it was measured."""

    images_per_sec: float
    source: str
    eval_s: float | None = None  # evaluation seconds per epoch, when the source measured them
    run_id: str | None = None  # the MLflow run it came from
    device: str | None = None  # the device a probe ran on


def rate_params(work: Workload) -> dict[str, str]:
    """The params (as MLflow holds them) a run must share with this study for its rate to count."""
    params = work.experiment.flat_params()
    keys = [k for k in RATE_KEYS if k in params and k not in work.search_keys]
    keys.append("train.gpus_per_worker" if work.experiment.train.use_gpu else "train.cpus_per_worker")
    return {k: "None" if params[k] is None else str(params[k]) for k in keys}


def rate_from_mlflow(work: Workload, uri: str | None = None, max_runs: int = 20) -> tuple[Rate | None, str]:
    """The latest run of the same model and layout with an `images_per_sec` history: the
    median over its epochs (and of its evaluation time). (None, why) when there is none."""
    from .. import tracking

    uri = uri or work.experiment.tracking.resolved_uri()
    shown = _shown(uri)
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :].split("?")[0]):
        return None, f"no MLflow store at {shown} yet"
    wanted = rate_params(work)
    where = " and ".join(f"params.`{k}` = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in wanted.items())
    try:
        tracking.check_reachable(uri)
        store = tracking.tracker(uri)
        for run in store.newest_runs(f"{where} and metrics.{RATE_METRIC} > 0", max_results=max_runs):
            rates = _finite(store.metric_history(run.info.run_id, RATE_METRIC))
            if not rates:
                continue
            evals = _finite(store.metric_history(run.info.run_id, EVAL_METRIC))
            name = run.info.run_name or ""
            return (
                Rate(
                    statistics.median(rates),
                    f"run {run.info.run_id[:8]} ({name[:40]}; median of {len(rates)} epochs)",
                    statistics.median(evals) if evals else None,
                    run.info.run_id,
                ),
                "",
            )
    except Exception as exc:  # no rate is worth a note, never a failed plan
        return None, f"MLflow store {shown} not searched: {str(exc).splitlines()[0][:160]}"
    return None, f"no earlier run of this model and layout in {shown}; `pisa study plan --probe` measures one"


def _finite(history) -> list[float]:
    return [m.value for m in history if math.isfinite(m.value) and m.value > 0]


def _shown(uri: str) -> str:
    from ..core.uris import redact

    return redact(uri)


def rate_from_probe(work: Workload) -> Rate:
    """A few steps of the study's base config on this machine, one worker's rate x the workers
    (linear scaling assumed: a probe has no all-reduce)."""
    from ..training.probe import probe_rate

    probe = probe_rate(work.experiment)
    workers = work.experiment.train.workers
    scaled = f", x {workers} workers" if workers > 1 else ""
    where = f"{probe.device}, {probe.threads} thread(s)" if probe.device == "cpu" else probe.device
    source = f"a probe ({probe.steps} steps on {where}, {probe.step_s * 1e3:.0f} ms each{scaled})"
    # evaluation is sharded over the workers: each runs the detector over its part of the val set
    eval_s = math.ceil(probe.val_images / workers) * probe.eval_image_s
    device = "cpu" if probe.device == "cpu" else "cuda"
    return Rate(probe.images_per_sec * workers, source, eval_s=eval_s, device=device)
