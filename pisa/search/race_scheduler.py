"""The study's racing scheduler: Tune's FIFO, plus the racing rule at each seed batch's end.

A racing trial (`pisa.trials.race`) reports its mean over the seeds it has trained after
every batch. At each such result (one at the schedule's last epoch) the scheduler pairs the
trial's per-seed values with the incumbent's, the best point that finished all its seeds,
and stops the trial when `RacingRule` says it is behind. Stopping is Tune's own STOP: the
trial ends as ASHA's stopped trials do, and the searcher tells Optuna PRUNED (a point with
fewer than `max_seeds` seeds, `PruningOptunaSearch`).

The incumbent is read from the trials Tune holds (their last results), not kept here: a
study resumed after a lost driver decides as it would have.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from ..core.objective import Objective
from ..core.progress import say
from ..trials.seeds import seed_values
from .racing import RacingRule


class RacingScheduler(FIFOScheduler):
    """FIFO that stops a point once it is behind the incumbent on their common seeds."""

    def __init__(self, rule: RacingRule, objective: Objective, epochs: int):
        super().__init__()
        self.rule = rule
        self.objective = objective
        self.epochs = int(epochs)
        # a decision per result: Tune must not hand over several at once
        self._supports_buffered_results = False

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        if int(result.get("epoch", 0)) < self.epochs:
            return TrialScheduler.CONTINUE
        point = seed_values(result, self.objective.metric)
        incumbent = self.incumbent(tune_controller.get_trials(), trial)
        decision = self.rule.decide(point, incumbent[1] if incumbent else None, self.objective)
        if decision != "stop":
            return TrialScheduler.CONTINUE
        assert incumbent is not None
        say(
            f"racing: trial {trial.trial_id} stopped after {len(point)} of {self.rule.max_seeds} seeds, "
            f"behind {incumbent[0]} on their common seeds"
        )
        return TrialScheduler.STOP

    def incumbent(self, trials: list[Trial], other_than: Trial) -> tuple[str, dict[int, float]] | None:
        """The trial that finished all its seeds with the best mean, and its seed values."""
        best: tuple[float, str, dict[int, float]] | None = None
        for trial in trials:
            if trial is other_than or trial.status != Trial.TERMINATED:
                continue
            values = seed_values(trial.last_result or {}, self.objective.metric)
            if len(values) < self.rule.max_seeds:
                continue  # stopped by the race (or a budget): not a finished point
            mean = sum(values.values()) / len(values)
            if best is None or self.objective.better(mean, best[0]):
                best = (mean, trial.trial_id, values)
        return (best[1], best[2]) if best else None
