"""MLflow's internal API: the one module of pisa that touches it. Checked against the versions
in `CHECKED_AGAINST` (the lock, constraints.txt); every use is listed in `PRIVATE_APIS`, which
tests/test_private_apis.py resolves on the installed MLflow."""

from __future__ import annotations

from typing import Any

from ..core.private_api import PrivateApi

CHECKED_AGAINST = {"mlflow": "3.17.2"}

PRIVATE_APIS = [
    PrivateApi(
        "mlflow",
        "mlflow.system_metrics.system_metrics_monitor",
        "SystemMetricsMonitor",
        "system metrics sampled into a run pisa's client made (MLflow starts its own only with mlflow.start_run)",
        attrs=("start", "finish"),
    ),
    PrivateApi(
        "mlflow",
        "mlflow.tracking.context.registry",
        "resolve_tags",
        "the source, git commit and user tags mlflow.start_run sets, on runs pisa's client makes",
    ),
    PrivateApi("mlflow", "mlflow.utils.validation", "MAX_PARAM_VAL_LENGTH", "params cut at MLflow's own limit"),
    PrivateApi("mlflow", "mlflow.utils.validation", "MAX_TAG_VAL_LENGTH", "tags cut at MLflow's own limit"),
]


def system_metrics_monitor(run_id: str, **kwargs: Any) -> Any:
    """MLflow's system-metrics sampler for run `run_id` (not started)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(run_id, **kwargs)


def max_param_length() -> int:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return int(MAX_PARAM_VAL_LENGTH)


def max_tag_length() -> int:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return int(MAX_TAG_VAL_LENGTH)


def context_tags() -> dict[str, str]:
    """The tags MLflow's context providers give a run started here (source, git commit, user)."""
    from mlflow.tracking.context.registry import resolve_tags

    return dict(resolve_tags())
