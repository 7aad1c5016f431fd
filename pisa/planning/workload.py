"""What a cost plan prices, handed over by whoever runs the trainings: a search's trials of
one base config (its layout, seeds, scheduler), without the search itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.config import ExperimentConfig
from .packing import Packing


@dataclass(frozen=True)
class Workload:
    name: str
    source: Path  # the file it came from, for messages
    experiment: ExperimentConfig  # the base config; its `train.*` is one trial's layout and resources
    num_samples: int
    search_keys: tuple[str, ...]
    seeds: int  # trainings per point, side by side
    max_concurrent_trials: int
    scheduler: str  # "asha" or "fifo"
    grace_period: int = 1
    reduction_factor: float = 2.0
    packing: Packing | None = None  # `pack: auto`'s choice, when the study asked for one
    # the validation stage after the search (`validation:`): its points (the top ones and the
    # paper's defaults) trained again on fresh seeds, one training each, full schedule; 0: none
    validation_points: int = 0
    validation_seeds: int = 0
    # racing (`racing:`): a point's seeds at most; the first `seeds` train side by side, the
    # others one at a time. 0: no racing, a point trains `seeds`
    race_seeds: int = 0

    @property
    def validation_trainings(self) -> int:
        """At most this many: fewer when a top point is the paper's defaults."""
        return self.validation_points * self.validation_seeds

    @property
    def epochs(self) -> int:
        return self.experiment.train.resolved().epochs
