"""One study point over several seeds: N `TorchTrainer`s side by side, one Tune result.

Each seed trains as its own Ray Train run (named `<trial>-seed<S>`, so a resumed trial
continues every seed from its own checkpoint). A Ray Train callback in each run sends the
epoch's metrics to a queue; the trainable reports to Tune once every seed has finished
that epoch: the mean over seeds of every metric, plus each seed's value of the study
metric (`seed_<S>/<metric>`) and their standard deviation. ASHA therefore compares points
by their seed mean, epoch by epoch, as it would single runs.
"""

from __future__ import annotations

import math
import statistics
import threading
from typing import Any

from ..core.epoch_report import SEED_PREFIX
from ..core.errors import WrappingError, one_line

CHECKPOINT_PATH_KEY = "checkpoint_path"


def seed_key(seed: int, metric: str) -> str:
    return f"{SEED_PREFIX}{seed}/{metric}"


def seed_values(result: dict[str, Any], metric: str) -> dict[int, float]:
    """Seed -> value of `metric` in a trial's result (`seed_<S>/<metric>` keys)."""
    out = {}
    for key, value in result.items():
        head, _, name = key.partition("/")
        if name == metric and head.startswith(SEED_PREFIX) and head[len(SEED_PREFIX) :].isdigit():
            out[int(head[len(SEED_PREFIX) :])] = float(value)
    return out


def mean_report(reports: dict[int, dict[str, Any]], metric: str) -> dict[str, Any]:
    """The Tune result of one epoch: numeric metrics averaged over seeds, the study metric
    also per seed and as a standard deviation; the first seed's checkpoint path."""
    seeds = sorted(reports)
    keys = set.intersection(*(set(r) for r in reports.values()))
    out: dict[str, Any] = {}
    for key in keys:
        values = [reports[s][key] for s in seeds]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            finite = [float(v) for v in values if math.isfinite(v)]
            out[key] = statistics.fmean(finite) if len(finite) == len(values) else float("nan")
    for s in seeds:
        if metric in reports[s]:
            out[seed_key(s, metric)] = float(reports[s][metric])
    values = [float(reports[s][metric]) for s in seeds if metric in reports[s]]
    if len(values) > 1 and all(math.isfinite(v) for v in values):
        out[f"{metric}_seed_std"] = statistics.stdev(values)
    out["epoch"] = int(reports[seeds[0]].get("epoch", 0))
    out["seeds"] = len(seeds)
    if CHECKPOINT_PATH_KEY in reports[seeds[0]]:
        out[CHECKPOINT_PATH_KEY] = reports[seeds[0]][CHECKPOINT_PATH_KEY]
    return out


def _seed_callback(queue, seed: int):
    """A Ray Train callback (runs in that seed's controller): forward each report."""
    from ray.train import UserCallback

    class SeedReporter(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if not metrics:
                return
            item = dict(metrics[0])
            if checkpoint:
                item[CHECKPOINT_PATH_KEY] = checkpoint.path
            queue.put((seed, item))

    return SeedReporter()


class SeedFailed(WrappingError):
    """One seed's training failed: the whole point fails (its mean would be biased)."""


def _raise_first(errors: dict[int, BaseException]) -> None:
    """The lowest failed seed's error, chained: the pisa error inside (a non-finite loss, bad
    data) still decides the exit code and that a retry would fail the same way."""
    seed = min(errors)
    raise SeedFailed(f"seed {seed}: {one_line(errors[seed])}") from errors[seed]


def fit_seeds(exp, name: str, seeds: list[int], metric: str, *, report_epochs: bool = True, on_report=None) -> None:
    """Train `exp` once per seed at the same time; report per-epoch seed means to Tune
    (unless not `report_epochs`). `on_report(seed, metrics)`: each seed's every report."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from ..training.engine import stopped_on  # torch: where the seeds train, not where this is imported
    from ..training.train import build_trainer

    queue = Queue(actor_options={"num_cpus": 0})
    errors: dict[int, BaseException] = {}
    done: set[int] = set()

    def fit(seed: int) -> None:
        cfg = exp.model_copy(update={"train": exp.train.model_copy(update={"seed": seed})})
        try:
            result = build_trainer(cfg, name=f"{name}-seed{seed}", callbacks=[_seed_callback(queue, seed)]).fit()
            error = getattr(result, "error", None) or stopped_on(result)
            if error is not None:
                errors[seed] = error
        except Exception as exc:  # TrainingFailedError and friends
            errors[seed] = exc
        finally:
            done.add(seed)

    threads = [threading.Thread(target=fit, args=(s,), name=f"seed-{s}", daemon=True) for s in seeds]
    for t in threads:
        t.start()
    pending: dict[int, dict[int, dict[str, Any]]] = {}  # epoch -> seed -> metrics
    reported = 0
    while True:
        try:
            seed, item = queue.get(timeout=1.0)
            if on_report is not None:
                on_report(seed, item)
            if report_epochs:
                pending.setdefault(int(item.get("epoch", 0)), {})[seed] = item
        except Empty:
            pass
        if errors:
            _raise_first(errors)
        for epoch in sorted(pending):
            if epoch <= reported:
                pending.pop(epoch)
            elif len(pending[epoch]) == len(seeds):
                tune.report(mean_report(pending.pop(epoch), metric))
                reported = epoch
        if len(done) == len(seeds) and queue.empty():
            break
    for t in threads:
        t.join()
    if errors:
        _raise_first(errors)
