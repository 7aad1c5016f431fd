"""Tune's per-trial result files (`progress.csv`, `result.json`), as Tune writes them by default.

pisa turns Tune's automatic loggers off (`TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`, see
`training.ray_runtime.quiet_libraries`) to leave out the TensorboardX one, and adds these two back
to every Tuner it builds.
"""

from __future__ import annotations

from typing import Any


def result_files() -> list[Any]:
    """Tune's CSV and JSON logger callbacks."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]
