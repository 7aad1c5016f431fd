"""What a search, a comparison and a ranking optimise: one metric and its direction, and the
one place that decides which of two values is the better."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: Literal["max", "min"] = "max"

    @property
    def sign(self) -> int:
        """+1 when higher is better, -1 when lower is."""
        return 1 if self.mode == "max" else -1

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        """Optuna's word for the mode."""
        return "maximize" if self.mode == "max" else "minimize"

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` is strictly better than `than` (anything beats None)."""
        return than is None or self.sign * value > self.sign * than

    def best(self, values: Iterable[float]) -> float | None:
        """The best finite value, None when there is none."""
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        return max(finite) if self.mode == "max" else min(finite)

    def best_of(self, items: Iterable[T], value: Callable[[T], float]) -> T | None:
        """The item whose `value` is best; on a tie the first."""
        found: T | None = None
        found_value: float | None = None
        for item in items:
            v = value(item)
            if math.isfinite(v) and self.better(v, found_value):
                found, found_value = item, v
        return found

    def rank_key(self, value: float | None) -> float:
        """A sort key that puts the best first (and None last)."""
        return math.inf if value is None else -self.sign * value
