"""Seed statistics: how sure a comparison of detectors is, from a handful of seeds.

Pure Python (no SciPy at run time): Student's t quantiles come from the exact CDF for
integer degrees of freedom (Abramowitz & Stegun 26.7.3-4), inverted by bisection. The
intervals are two-sided 95% by default. A *paired* difference uses the same seeds for
both variants, which removes the part of the noise the seed itself causes (data order,
initialisation): it is the comparison to read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .objective import Objective


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        series, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):  # cos, 2/3 cos^3, 2*4/(3*5) cos^5, ...
            series += term
            term *= (2 * k) / (2 * k + 1) * c2
        central = (2 / math.pi) * (theta + s * math.cos(theta) * series)
    else:
        series, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # 1, 1/2 cos^2, 1*3/(2*4) cos^4, ...
            series += term
            term *= (2 * k - 1) / (2 * k) * c2
        central = s * series
    return 0.5 + math.copysign(central / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (e.g. p=0.975 for a two-sided 95% interval)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a t confidence interval of some values."""

    n: int
    mean: float | None
    std: float | None  # None for fewer than 2 values
    ci_low: float | None
    ci_high: float | None
    confidence: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None or self.mean is None else self.ci_high - self.mean


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """`mean +- t(1-a/2, n-1) * s / sqrt(n)`; no interval from a single value."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Summary(0, None, None, None, None, confidence)
    mean = statistics.fmean(vals)
    if n == 1:
        return Summary(1, mean, None, None, None, confidence)
    std = statistics.stdev(vals)
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, confidence)


@dataclass(frozen=True)
class Paired:
    """A variant against the baseline over the seeds both finished (variant - baseline)."""

    seeds: tuple[int, ...]
    difference: Summary
    wins: int  # seeds where the variant is ahead
    losses: int
    ties: int

    @property
    def significant(self) -> bool:
        """True when the interval of the paired difference excludes zero."""
        d = self.difference
        return d.ci_low is not None and d.ci_high is not None and (d.ci_low > 0 or d.ci_high < 0)


def paired(
    variant: dict[int, float], baseline: dict[int, float], confidence: float = 0.95, mode: str = "max"
) -> Paired:
    """Paired difference per seed; `mode='min'` counts a lower value as a win."""
    seeds = tuple(sorted(set(variant) & set(baseline)))
    diffs = [variant[s] - baseline[s] for s in seeds]
    objective = Objective("difference", "max" if mode == "max" else "min")
    wins = sum(objective.better(d, 0.0) for d in diffs)
    losses = sum(objective.better(0.0, d) for d in diffs)
    return Paired(seeds, summarize(diffs, confidence), wins, losses, len(diffs) - wins - losses)


def within_noise(first: dict[int, float], second: dict[int, float], confidence: float = 0.95) -> bool | None:
    """Whether two points' per-seed values cannot be told apart (paired interval holds 0).

    None when there are fewer than two common seeds: nothing to estimate the noise from."""
    p = paired(first, second, confidence)
    if p.difference.ci_low is None:
        return None
    return not p.significant


def verdict(p: Paired | None, mode: str) -> str:
    """What a row's paired difference says: better / worse only when its interval excludes 0
    (`mode` "min": lower is better); "reference" for the row the others are compared with."""
    if p is None:
        return "reference"
    d = p.difference
    if d.ci_low is None:
        return "too few seeds"
    if not p.significant:
        return "no significant difference"
    objective = Objective("difference", "max" if mode == "max" else "min")
    bound = d.ci_low if mode == "max" else d.ci_high  # the end of the interval nearest to 0
    better = bound is not None and objective.better(bound, 0.0)
    return "better" if better else "worse"
