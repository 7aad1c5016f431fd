"""Seed racing: a point earns more seeds only while it can still beat the incumbent.

A point starts on `min_seeds` seeds. After each batch its per-seed values are paired with
the incumbent's on the seeds both trained (the same seed trains the same data order and
initialisation for every point, so the pair removes that part of the noise), and it is
stopped when the one-sided upper bound of the paired difference is below zero: it is worse,
at `confidence`, and more seeds would only confirm it. A point that survives `max_seeds`
seeds is finished; its mean is what the sampler learns from. The rule is the paired t-test
of `pisa.core.stats`, one-sided.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal

from ..core.objective import Objective
from ..core.stats import t_quantile

Decision = Literal["stop", "more", "done"]


@dataclass(frozen=True)
class RacingRule:
    min_seeds: int = 2
    max_seeds: int = 4
    confidence: float = 0.8  # one-sided: a point is stopped when it is worse at this level

    def __post_init__(self) -> None:
        if self.min_seeds < 2 or self.max_seeds < self.min_seeds:
            raise ValueError(f"racing: need 2 <= min_seeds <= max_seeds, got {self.min_seeds} and {self.max_seeds}")

    def decide(self, point: dict[int, float], incumbent: dict[int, float] | None, objective: Objective) -> Decision:
        """What to do with `point` (seed -> value) against `incumbent` (None: it is the first)."""
        if incumbent is not None and self.behind(point, incumbent, objective):
            return "stop"
        return "done" if len(point) >= self.max_seeds else "more"

    def behind(self, point: dict[int, float], incumbent: dict[int, float], objective: Objective) -> bool:
        """Whether `point` is worse than `incumbent` on their common seeds, one-sided at `confidence`."""
        seeds = sorted(set(point) & set(incumbent))
        if len(seeds) < 2:
            return False
        diffs = [objective.sign * (point[s] - incumbent[s]) for s in seeds]
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        if sd == 0:
            return mean < 0
        upper = mean + t_quantile(self.confidence, len(seeds) - 1) * sd / math.sqrt(len(seeds))
        return upper < 0
