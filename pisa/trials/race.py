"""Seed racing inside one trial: the point's seeds in batches, a Tune result after each.

The first batch trains `min_seeds` seeds side by side and reports every epoch (their mean,
as `trials.seeds` does); each later batch trains one more seed without epoch reports. After
every batch the trial reports its final-epoch mean over all the seeds it has trained, with
each seed's value; the study's racing scheduler (`pisa.search.race_scheduler`) then lets it
go on or stops it. Tune reads the next result only after the scheduler has decided on the
last one, so a point that is behind never starts its next seed.

Each seed's final metrics are kept in the trial's `race.json` as they arrive: a trial
restarted after a crash or a lost driver trains only the seeds that have none.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..core import storage
from ..core.errors import StudyError
from .seeds import fit_seeds, mean_report

RACE_FILE = "race.json"
RACE_KEY = "race_seeds"  # in a batch's result: the seeds it is the mean over

# trains `seeds` of the point (their epochs reported to Tune when the flag says so), calling
# back with each seed's every report
TrainBatch = Callable[[list[int], bool, Callable[[int, dict[str, Any]], None]], None]


def batches(seeds: list[int], min_seeds: int) -> list[list[int]]:
    """The first `min_seeds` seeds together, then one at a time."""
    return [seeds[:min_seeds]] + [[s] for s in seeds[min_seeds:]]


def read_finished(location: str) -> dict[int, dict[str, Any]]:
    """Seed -> final metrics of the seeds this trial has finished (none: an empty dict)."""
    if not storage.exists(location):
        return {}
    try:
        data = json.loads(storage.read_text(location))
    except (ValueError, OSError):  # a torn write: those seeds train again
        return {}
    return {int(k): v for k, v in data.items()}


def race_point(
    seeds: list[int],
    min_seeds: int,
    epochs: int,
    metric: str,
    race_file: str,
    train_batch: TrainBatch,
    report: Callable[[dict[str, Any]], None],
) -> dict[int, dict[str, Any]]:
    """Train the point's seeds batch by batch, reporting after each; the finished seeds."""
    finished = read_finished(race_file)

    def keep(seed: int, item: dict[str, Any]) -> None:
        if int(item.get("epoch", 0)) >= epochs:
            finished[seed] = dict(item)
            storage.write_text(race_file, json.dumps(finished, default=str))

    raced: list[int] = []
    for number, batch in enumerate(batches(seeds, min_seeds)):
        todo = [s for s in batch if s not in finished]
        if todo:
            train_batch(todo, number == 0, keep)
        missing = [s for s in batch if s not in finished]
        if missing:
            raise StudyError(f"seed(s) {missing} ended without a result for epoch {epochs}")
        raced += batch  # a restarted race reports its batches as before: the same decisions
        report({**mean_report({s: finished[s] for s in raced}, metric), RACE_KEY: len(raced)})
    return finished


def fit_race(exp, name: str, seeds: list[int], min_seeds: int, metric: str, race_file: str) -> None:
    """`race_point` with real trainings (`trials.seeds.fit_seeds`), reporting to Tune."""
    from ray import tune

    def train(batch: list[int], report_epochs: bool, on_report) -> None:
        fit_seeds(exp, name, batch, metric, report_epochs=report_epochs, on_report=on_report)

    race_point(seeds, min_seeds, exp.train.resolved().epochs, metric, race_file, train, tune.report)
