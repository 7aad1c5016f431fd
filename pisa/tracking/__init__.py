"""MLflow: the store's Tracker, a training's run, tag names, run lineage, trained detectors, the registry; imports
models, data, evaluation, core."""

from .store import Tracker, check_reachable, tracker

# the store's entry points, the ones every layer above uses: `tracking.tracker(uri)` (MLflow's own
# client stays inside this package)
__all__ = ["Tracker", "check_reachable", "tracker"]
