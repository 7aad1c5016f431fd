"""A study's plan against what it did, at its end: trial-epochs and wall time.

The plan is the one logged when the study started (`plan.json` on its MLflow run; `pisa study
extend` logs the extended study's). Actual trial-epochs are its trial runs' epochs in MLflow;
actual wall time is the sum of its driver legs that ended (each leg logs `wall_s` on the
study's run at its end; a killed leg's time is not recorded). The planned wall is the plan's
range with its overhead term (`cost_plan.OVERHEAD`): ASHA's lower bound at the lower overhead
to FIFO at the higher.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from .. import tracking
from ..planning.cost_plan import OVERHEAD, with_overhead
from .results import StudyOutcome

WALL_METRIC = "wall_s"


def fmt_wall(seconds: float) -> str:
    """h:mm:ss (a study of minutes is not all 0:01)."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def logged_plan(uri: str, parent: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory(prefix="pisa-plan-") as tmp:
        try:
            path = tracking.tracker(uri).download_artifact(parent, "plan.json", tmp)
        except Exception:  # no plan was logged (it never stops a study)
            return None
        with open(path) as f:
            return json.load(f)


def compare(uri: str, parent: str, outcome: StudyOutcome, leg_wall_s: float) -> str:
    """Log this leg's wall, then planned against actual on the study's run; the one line to print."""
    store = tracking.tracker(uri)
    legs = store.metric_history(parent, WALL_METRIC)
    store.log_metrics(parent, {WALL_METRIC: leg_wall_s}, step=len(legs) + 1)
    wall = sum(m.value for m in legs) + leg_wall_s
    epochs = sum(t.epochs for t in outcome.trials)
    plan = logged_plan(uri, parent)
    if plan is None:
        return f"plan vs actual: no plan logged; {epochs} trial-epochs, {fmt_wall(wall)} wall"
    fifo, asha = plan["fifo"], plan.get("asha")
    low = asha or fifo
    metrics: dict[str, float] = {
        "actual_trial_epochs": epochs,
        "actual_wall_s": wall,
        "planned_trial_epochs_low": low["trial_epochs"],
        "planned_trial_epochs_high": fifo["trial_epochs"],
    }
    planned_epochs = (
        f"{low['trial_epochs']}-{fifo['trial_epochs']} (ASHA-FIFO)" if asha else f"{fifo['trial_epochs']} (FIFO)"
    )
    line = f"plan vs actual: {epochs} trial-epochs, planned {planned_epochs}; {fmt_wall(wall)} wall"
    if low.get("wall_s") is not None and fifo.get("wall_s") is not None:
        lo_share, hi_share = plan.get("overhead") or OVERHEAD
        lo, hi = with_overhead(low["wall_s"], lo_share), with_overhead(fifo["wall_s"], hi_share)
        metrics.update(planned_wall_s_low=lo, planned_wall_s_high=hi)
        where = "within" if lo * 0.75 <= wall <= hi * 1.25 else "outside"
        line += (
            f", planned {fmt_wall(lo)}-{fmt_wall(hi)} with {lo_share:.0%}-{hi_share:.0%} overhead "
            f"({fmt_wall(low['wall_s'])}-{fmt_wall(fifo['wall_s'])} of epochs alone), {where} ±25%"
        )
    else:
        line += ", planned wall unknown (the plan had no rate)"
    store.log_metrics(parent, metrics, step=0)
    store.set_tags(parent, {"pisa.plan_vs_actual": line})
    return line


def compare_validation(uri: str, parent: str, run_id: str | None, trainings: int, wall_s: float) -> str:
    """The validation stage's trainings and this leg's wall against the plan's stage (the plan
    logged at the study's start), on the stage's run and the study's; the one line to print."""
    plan = logged_plan(uri, parent)
    line = f"validation plan vs actual: {trainings} trainings, {fmt_wall(wall_s)} wall"
    if plan is None or not plan.get("validation"):
        return line + " (no validation stage in the logged plan)"
    stage, planned = plan["validation"], max(int(plan["validation_trainings"]), 1)
    line = f"validation plan vs actual: {trainings} trainings, planned <= {planned}; {fmt_wall(wall_s)} wall"
    metrics: dict[str, float] = {"validation_actual_wall_s": wall_s, "validation_trainings": trainings}
    if stage.get("wall_s") is not None:
        lo_share, hi_share = plan.get("overhead") or OVERHEAD
        # the plan priced its upper bound; a stage of fewer trainings takes their share of it
        lo, hi = (with_overhead(stage["wall_s"] * trainings / planned, s) for s in (lo_share, hi_share))
        where = "within" if lo * 0.75 <= wall_s <= hi * 1.25 else "outside"
        line += f", planned {fmt_wall(lo)}-{fmt_wall(hi)} for {trainings} with the overhead, {where} ±25%"
        metrics.update(validation_planned_wall_s_low=lo, validation_planned_wall_s_high=hi)
    store = tracking.tracker(uri)
    if run_id is not None:
        store.log_metrics(run_id, metrics, step=0)
    store.set_tags(parent, {"pisa.validation_plan_vs_actual": line})
    return line
