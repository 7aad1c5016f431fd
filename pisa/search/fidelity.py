"""Rung fidelity: does an early epoch rank a study's trials as the last epoch does?

ASHA stops trials on their metric at its rungs (the grace period, then x reduction factor
each). A detector trained from scratch may have an epoch-2 AP of 0.02-0.03 that ranks
points poorly, and then ASHA stops the points that would have won. Over the trials that
reached the last epoch, the Spearman rank correlation between each rung's metric and the
final one says whether the rungs could be trusted (for a FIFO study: every earlier epoch,
what a grace period there would have seen). ASHA's finishers are the survivors of its
rungs, so its values read on a narrowed field: a low one is a real warning.

Pure Python (SciPy is a test-only dependency); the metric histories come from MLflow.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import tracking
from .schema import SchedulerConfig

GOOD_ENOUGH = 0.5  # below this at the grace period, `pisa study best` warns
MIN_TRIALS = 3  # fewer finished trials: no correlation is reported
METRIC_PREFIX = "rung_fidelity"


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span (as SciPy's `rankdata`)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's over average ranks); None where it is
    undefined: fewer than 2 pairs, or either side constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def rung_epochs(scheduler: SchedulerConfig, epochs: int) -> list[int]:
    """The epochs before the last at which the scheduler decides: ASHA's rungs (grace
    period x reduction factor^k, as Ray's single bracket places them; a fractional one
    acts at the next whole epoch), or for FIFO every epoch before the last."""
    if scheduler.type == "fifo":
        return list(range(1, epochs))
    grace = min(scheduler.grace_period, epochs)  # as the tuner caps it
    out: list[int] = []
    milestone = float(grace)
    while (epoch := math.ceil(milestone - 1e-9)) < epochs:
        if epoch not in out:
            out.append(epoch)
        milestone *= scheduler.reduction_factor
    return out


@dataclass(frozen=True)
class Rung:
    epoch: int
    spearman: float | None  # None: cannot be computed
    trials: int  # finished trials with a value at this epoch


@dataclass(frozen=True)
class Fidelity:
    """Each rung's Spearman correlation with the final metric, over the finished trials."""

    metric: str
    scheduler: SchedulerConfig
    epochs: int  # the last epoch
    finished: int  # trials with a value at the last epoch
    rungs: list[Rung]
    seeds: int = 1  # trainings per point: the next count is what `warning` suggests

    @property
    def grace(self) -> Rung | None:
        """ASHA's first rung, the one that stops most; None for FIFO (nothing stopped on it)."""
        return self.rungs[0] if self.scheduler.type == "asha" and self.rungs else None

    def metrics(self) -> dict[str, float]:
        """What the study's MLflow run gets: one metric per computable rung, and the count."""
        out: dict[str, float] = {f"{METRIC_PREFIX}.finished_trials": float(self.finished)}
        for rung in self.rungs:
            if rung.spearman is not None:
                out[f"{METRIC_PREFIX}.epoch_{rung.epoch}"] = rung.spearman
        return out

    def text(self) -> str:
        """The report's table: one line per rung."""
        s = self.scheduler
        how = (
            f"ASHA, grace period {s.grace_period}, reduction factor {s.reduction_factor:g}"
            if s.type == "asha"
            else "FIFO: every epoch before the last"
        )
        head = (
            f"rung fidelity ({how}): Spearman of {self.metric} at each rung against epoch {self.epochs}, "
            f"over the {self.finished} trial(s) that reached it"
        )
        if not self.rungs:
            return head + "\n  no rung before the last epoch: no trial could be stopped early"
        lines = [head, f"  {'epoch':>5}  {'spearman':>8}  {'trials':>6}"]
        for r in self.rungs:
            value = "-" if r.spearman is None else f"{r.spearman:.2f}"
            lines.append(f"  {r.epoch:>5}  {value:>8}  {r.trials:>6}")
        if any(r.spearman is None for r in self.rungs):
            lines.append(f"  (-: cannot be computed: under {MIN_TRIALS} trials, or the metric constant)")
        return "\n".join(lines)

    def warning(self) -> str | None:
        """One line when ASHA's grace period ranks the finished trials poorly (Spearman
        under `GOOD_ENOUGH`) or nobody can tell; None otherwise and for FIFO."""
        rung = self.grace
        if rung is None or (rung.spearman is not None and rung.spearman >= GOOD_ENOUGH):
            return None
        if rung.spearman is not None:
            what = f"ranks trials poorly: Spearman {rung.spearman:.2f} over {rung.trials} finished trials"
        elif rung.trials < MIN_TRIALS:
            why = f"over {rung.trials} finished trial(s), {MIN_TRIALS} needed"
            what = f"cannot be checked: Spearman cannot be computed {why}"
        else:
            why = f"the metric is constant over {rung.trials} finished trials"
            what = f"cannot be checked: Spearman cannot be computed, {why}"
        later = next((r for r in self.rungs[1:] if r.spearman is not None and r.spearman >= GOOD_ENOUGH), None)
        hint = f" (epoch {later.epoch}: {later.spearman:.2f})" if later and later.spearman is not None else ""
        return (
            f"warning: ASHA's grace period (epoch {rung.epoch}) {what}; use a longer "
            f"scheduler.grace_period{hint} or seeds: {self.seeds + 1}"
        )

    def write_csv(self, path: Path) -> Path:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "spearman", "trials", "last_epoch"])
            for r in self.rungs:
                writer.writerow([r.epoch, "" if r.spearman is None else f"{r.spearman:.6g}", r.trials, self.epochs])
        return path


def correlations(histories: Mapping[str, Mapping[int, float]], rungs: Iterable[int], epochs: int) -> list[Rung]:
    """Each rung's Spearman correlation with epoch `epochs`, over the runs (their per-epoch
    values) that have a finite value at both."""
    out = []
    for epoch in rungs:
        pairs = [
            (h[epoch], h[epochs])
            for h in histories.values()
            if epoch in h and epochs in h and math.isfinite(h[epoch]) and math.isfinite(h[epochs])
        ]
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= MIN_TRIALS else None
        out.append(Rung(epoch, rho, len(pairs)))
    return out


def metric_histories(uri: str, run_ids: Iterable[str], metric: str) -> dict[str, dict[int, float]]:
    """Each run's `metric` by epoch (MLflow's step), the latest value where one was logged twice."""
    store = tracking.tracker(uri)
    out = {}
    for run_id in run_ids:
        history = sorted(store.metric_history(run_id, metric), key=lambda m: m.timestamp)
        out[run_id] = {int(m.step): float(m.value) for m in history}
    return out


def measure(
    uri: str, run_ids: Iterable[str], metric: str, scheduler: SchedulerConfig, epochs: int, seeds: int = 1
) -> Fidelity:
    """The rung fidelity of the trials `run_ids` (those that may have reached epoch `epochs`)."""
    histories = metric_histories(uri, run_ids, metric)
    finished = sum(1 for h in histories.values() if epochs in h and math.isfinite(h[epochs]))
    rungs = correlations(histories, rung_epochs(scheduler, epochs), epochs)
    return Fidelity(metric, scheduler, epochs, finished, rungs, seeds)
