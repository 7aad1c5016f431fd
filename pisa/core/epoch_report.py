"""What a training reports after each epoch (`EpochReport`): the train loop sends it to Ray
Train or Tune, and the MLflow writers log it at step = epoch.

A `TypedDict` names the keys every report has and the common optional ones; the rest ride
along in the same dict under their families' prefixes (`train_<loss>` for each of the
detector's losses, `bbox_*`/`segm_*` for the 12 COCO numbers of each IoU type, `pisa_*` for the
PISA weights' mean and max, `seed_<S>/<metric>` in a multi-seed trial's mean report).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, cast

SEED_PREFIX = "seed_"  # a multi-seed trial's per-seed values: `seed_<S>/<metric>`
# the prefixes of a report's open-ended key families
METRIC_PREFIXES = ("bbox_", "segm_", "train_", "pisa_", SEED_PREFIX)


class EpochCounters(TypedDict):
    """The keys of every epoch's report."""

    epoch: int  # 1-based: the MLflow step
    iteration: int  # global optimizer steps so far
    lr: float  # the first param group's LR at the epoch's end
    images_per_sec: float  # training throughput over all workers
    time_train_s: float
    time_eval_s: float


class EpochReport(EpochCounters, total=False):
    """One epoch's report (see the module docstring for the keys beyond these)."""

    train_loss: float  # the mean total loss of the epoch's steps (none for an empty loader)
    bbox_mAP: float
    bbox_mAP_50: float
    bbox_mAP_75: float
    segm_mAP: float  # Mask R-CNN
    segm_mAP_50: float
    segm_mAP_75: float


COUNTERS = frozenset(EpochCounters.__annotations__)


def epoch_report(counters: EpochCounters, *families: Mapping[str, float]) -> EpochReport:
    """A report of `counters` and the open-ended families' values (`train_*`, `bbox_*`, ...)."""
    merged: dict[str, Any] = {}
    for values in families:
        merged.update(values)
    merged.update(counters)
    return cast(EpochReport, merged)


def with_metrics(report: EpochReport, values: Mapping[str, float]) -> EpochReport:
    """`report` with `values` (keys of an open-ended family, `pisa_*`...) added."""
    return cast(EpochReport, {**report, **values})


def epoch_metrics(result: Mapping[str, Any]) -> EpochReport:
    """The training's own metrics in a Tune result (not Tune's timers and counters)."""
    return cast(EpochReport, {k: v for k, v in result.items() if k in COUNTERS or k.startswith(METRIC_PREFIXES)})
