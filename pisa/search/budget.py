"""A study held to a budget (`budget: {hours: N}` in the study file): GPU-hours, or CPU-hours
for CPU trials, counted as each trial run's recorded epoch times (`time_train_s +
time_eval_s`, from MLflow) x the GPUs (CPUs) a point holds.

Two Tune objects on the driver keep it, sharing one `Ledger` per study run:

- `BudgetLimiter` (the searcher's `ConcurrencyLimiter`) starts no trial whose planned cost to
  `max_t` would exceed what is left: the budget, less what is spent, less what the running
  trials would still cost to `max_t`. The planned cost is priced at the plan's rate (an earlier
  run of the same model and layout), else at the study's own measured epochs; before either
  exists, one trial at a time runs (it measures the rate). When nothing running could free
  room, it answers `Searcher.FINISHED`: the study ends on its budget.
- `BudgetStopper` records every epoch's time and stops a running trial at the end of its epoch
  once the budget is spent: a study overspends by at most one epoch per trial running then.

Nothing is counted from memory: a resumed study reads what was spent back from MLflow (an
epoch killed before it was logged was not recorded, and is not counted).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Stopper
from ray.tune.search import ConcurrencyLimiter, Searcher

from .. import tracking
from ..core.progress import say
from ..tracking import tags as tag
from ..tracking.tags import Status
from ..trials.capacity import footprint
from .study import Study

EPOCH_KEYS = ("time_train_s", "time_eval_s")
SPENT_METRIC = "budget_spent_hours"
BUDGET_METRIC = "budget_hours"
BUDGET_TAG = "pisa.budget"


@dataclass(frozen=True)
class BudgetSpec:
    """What the ledger needs, picklable (Tune saves its searcher and stopper with the study)."""

    uri: str
    experiment: str
    parent_run_id: str
    hours: float
    kind: str  # "GPU" or "CPU"
    point_footprint: float  # GPUs (CPUs) one point holds: a training's x its seeds
    max_t: int
    plan_epoch_s: float | None  # one epoch of a trial at the plan's rate; None: unknown
    # kept for the validation stage after the search: its trainings to max_t, one training each
    validation_trainings: int = 0
    training_footprint: float = 0.0  # GPUs (CPUs) one training holds

    @classmethod
    def of(cls, study: Study, uri: str, parent_run_id: str, plan_epoch_s: float | None) -> BudgetSpec:
        assert study.cfg.budget is not None
        kind, per_training = footprint(study.base_config.train)
        return cls(
            uri,
            study.base_config.tracking.experiment,
            parent_run_id,
            study.cfg.budget.hours,
            kind,
            per_training * study.seeds_at_once(),
            study.base_config.train.resolved().epochs,
            plan_epoch_s,
            study.workload().validation_trainings,
            per_training,
        )


def recorded_epochs(spec: BudgetSpec) -> tuple[dict[tuple[str, int], float], set[str]]:
    """Each trial run's epochs as MLflow recorded them: {(trial id, epoch): train + eval s};
    and the trials whose runs have not ended (they continue when the study does)."""
    store = tracking.tracker(spec.uri)
    epochs: dict[tuple[str, int], float] = {}
    unfinished: set[str] = set()
    for run in store.children(spec.experiment, spec.parent_run_id):
        trial_id = run.data.tags.get(tag.TRIAL)
        if not trial_id:
            continue
        if run.data.tags.get(tag.STATUS, str(Status.RUNNING)) not in tag.DONE:
            unfinished.add(trial_id)
        per_step: dict[int, float] = {}
        for key in EPOCH_KEYS:
            last: dict[int, float] = {}
            for m in store.metric_history(run.info.run_id, key):
                if math.isfinite(m.value):
                    last[int(m.step)] = m.value  # an epoch logged twice counts once
            for step, value in last.items():
                per_step[step] = per_step.get(step, 0.0) + value
        for step, seconds in per_step.items():
            epochs[(trial_id, step)] = seconds
    return epochs, unfinished


@dataclass
class Ledger:
    """What a study spent and has committed, in the driver process."""

    spec: BudgetSpec
    epochs: dict[tuple[str, int], float] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    stopped: set[str] = field(default_factory=set)  # trials the budget stopped before max_t
    said_finished: bool = False

    def load(self) -> Ledger:
        self.epochs, self.running = recorded_epochs(self.spec)
        return self

    def record(self, trial_id: str, result: dict[str, Any]) -> None:
        epoch = result.get("epoch")
        if epoch is None or not all(isinstance(result.get(k), (int, float)) for k in EPOCH_KEYS):
            return
        self.epochs[(trial_id, int(epoch))] = sum(float(result[k]) for k in EPOCH_KEYS)
        self.running.add(trial_id)

    def hours(self, seconds: float) -> float:
        return seconds * self.spec.point_footprint / 3600

    @property
    def spent(self) -> float:
        return self.hours(sum(self.epochs.values()))

    @property
    def epoch_s(self) -> float | None:
        """A trial's epoch: at the plan's rate, else the median of the study's recorded epochs."""
        if self.spec.plan_epoch_s is not None:
            return self.spec.plan_epoch_s
        return statistics.median(self.epochs.values()) if self.epochs else None

    def trial_cost(self) -> float | None:
        """A new trial's planned cost to max_t, in hours; None before a rate is known."""
        epoch_s = self.epoch_s
        return None if epoch_s is None else self.hours(self.spec.max_t * epoch_s)

    def reserved(self) -> float:
        """What the validation stage will cost (at most), kept out of the search's share."""
        epoch_s = self.epoch_s or 0.0
        spec = self.spec
        return spec.validation_trainings * spec.max_t * epoch_s * spec.training_footprint / 3600

    @property
    def search_hours(self) -> float:
        """The budget less the validation stage's share: what the search trials may spend."""
        return self.spec.hours - self.reserved()

    def committed(self) -> float:
        """What the running trials would still cost to max_t."""
        epoch_s = self.epoch_s or 0.0
        done = {t: max((e for (tid, e) in self.epochs if tid == t), default=0) for t in self.running}
        return sum(self.hours(max(0, self.spec.max_t - n) * epoch_s) for n in done.values())

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.search_hours

    def can_launch(self) -> bool:
        if self.exhausted:
            return False
        cost = self.trial_cost()
        if cost is None:  # no rate yet: one trial at a time measures it
            return not self.running
        return cost <= self.search_hours - self.spent - self.committed() + 1e-12

    def ended(self) -> bool:
        """Nothing runs and no new trial fits what is left."""
        return not self.running and not self.can_launch()


_LEDGERS: dict[BudgetSpec, Ledger] = {}


def ledger(spec: BudgetSpec) -> Ledger:
    """The study's ledger in this driver process, read from MLflow the first time it is asked for
    (the searcher and the stopper Tune restores with a study share it)."""
    found = _LEDGERS.get(spec)
    if found is None:
        found = _LEDGERS[spec] = Ledger(spec).load()
    return found


class BudgetLimiter(ConcurrencyLimiter):
    """`ConcurrencyLimiter` that also starts no trial the budget cannot pay to `max_t`."""

    def __init__(self, searcher: Searcher, max_concurrent: int, spec: BudgetSpec):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.spec = spec

    def suggest(self, trial_id: str) -> dict | None:
        book = ledger(self.spec)
        if not book.can_launch():
            if book.running and not book.exhausted:
                return None  # a running trial may end early and free its share
            if not book.said_finished:
                book.said_finished = True
                say(budget_line(book, "no further trial fits the budget"))
            return Searcher.FINISHED  # type: ignore[return-value]  # Tune's end-of-search marker
        suggestion = super().suggest(trial_id)
        if isinstance(suggestion, dict):
            book.running.add(trial_id)
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ledger(self.spec).running.discard(trial_id)
        return super().on_trial_complete(trial_id, result=result, error=error)


class BudgetStopper(Stopper):
    """Records each epoch's time; stops a trial at its epoch's end once the budget is spent."""

    def __init__(self, spec: BudgetSpec):
        self.spec = spec

    def __call__(self, trial_id: str, result: dict) -> bool:
        book = ledger(self.spec)
        book.record(trial_id, result)
        if not book.exhausted:
            return False
        if int(result.get("epoch", 0)) < self.spec.max_t and trial_id not in book.stopped:
            book.stopped.add(trial_id)
            say(f"budget spent: stopping trial {trial_id} after epoch {result.get('epoch')}")
        return True

    def stop_all(self) -> bool:
        return False


def stopped_by_budget(parent_run_id: str, trial_id: str) -> bool:
    return any(s.parent_run_id == parent_run_id and trial_id in b.stopped for s, b in _LEDGERS.items())


def budget_line(book: Ledger, why: str = "") -> str:
    spec = book.spec
    cost = book.trial_cost()
    epoch_s = book.epoch_s
    priced = (
        f"a trial to epoch {spec.max_t} ~{cost:.3g} at {epoch_s:.3g} s/epoch"
        f" ({'the plan' if spec.plan_epoch_s is not None else 'measured'})"
        if cost is not None and epoch_s is not None
        else "no rate yet"
    )
    head = f"budget {spec.hours:g} {spec.kind}-hours: spent {book.spent:.3g} over {len(book.epochs)} trial-epochs"
    if spec.validation_trainings and epoch_s is not None:
        head += f", ~{book.reserved():.3g} kept for the validation stage"
    return f"{head}; {priced}" + (f"; {why}" if why else "")


def finish(spec: BudgetSpec, done: int, planned: int) -> tuple[bool, str]:
    """At the study's end, from MLflow: whether it ended on its budget, and the report's line
    (also on the study's run: planned vs spent)."""
    book = ledger(spec).load()  # what is recorded, not what this process saw
    # or what the searcher and the stopper decided in this process (a restored searcher's
    # ledger may be priced apart from this one)
    decided = any(b.said_finished or b.stopped for s, b in _LEDGERS.items() if s.parent_run_id == spec.parent_run_id)
    ended = (book.ended() or book.exhausted or decided) and done < planned
    line = budget_line(book) + (f"; stopped on budget after {done} of {planned} trials" if ended else "")
    store = tracking.tracker(spec.uri)
    store.log_metrics(spec.parent_run_id, {BUDGET_METRIC: spec.hours, SPENT_METRIC: book.spent}, step=0)
    store.set_tags(spec.parent_run_id, {BUDGET_TAG: line})
    return ended, line
