"""What a study prints: one line per trial event, a progress line, a calm status table.

By default a study keeps Ray's own output off the console (worker logs stay in each
trial's directory under the Ray results directory, Ray's session logs under
/tmp/ray/session_latest/logs) and prints instead, from the driver:

    [pisa] trial 3/8 started: isr_p.k=1.2, isr_p.bias=0.31, carl.k=0.8, carl.bias=0.12
    [pisa] trial 3/8 epoch 2/4: bbox_mAP 0.0441 (train 21.3 s, eval 2.9 s)
    [pisa] trial 3/8 stopped early by asha after epoch 2: best bbox_mAP 0.0441
    [pisa] progress: 3/8 trials done (1 stopped early, 0 failed), 2 running, elapsed 0:02:31, ETA <=0:04:10

and Tune's trial table every `status_every_s` seconds. `pisa study run -v` brings Ray's
own output back instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from ..core.progress import say
from ..training import ray_private
from ..trials.fit import trial_error
from ..trials.race import RACE_KEY
from .state import PickledByStudyDir
from .study import Study
from .trainable import tune_space


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class StudyConsole(PickledByStudyDir, Callback):
    """Tune callback on the driver: the study's console output."""

    _transient = ("table",)  # Ray's own table class: rebuilt when a resumed study sets up

    def __init__(self, study: Study, status_every_s: float = 120.0, done_before: int = 0):
        self.study = study
        self.metric = study.cfg.metric
        self.total = study.cfg.num_samples
        self.done_before = done_before  # `pisa study extend`: the trials an earlier run finished
        self.max_epochs = study.base_config.train.resolved().epochs
        self.status_every_s = status_every_s
        self.start = time.time()
        self.last_status = time.time()
        self.numbers: dict[str, int] = {}
        self.epochs: dict[str, int] = {}
        self.outcomes: dict[str, str] = {}  # trial id -> finished | stopped early | failed
        self.table: Any = None  # Tune's trial table (an internal Ray class), when it could be built

    # ------------------------------------------------------------ helpers

    def _label(self, trial, trials: Sequence[Any] = ()) -> str:
        """`trial N/M`, N the trial's place in Tune's list of the study's trials (in the order they
        were created; a resumed study's list holds the trials of its earlier runs first), so a
        trial keeps its number across `pisa study resume`."""
        if trial.trial_id not in self.numbers:
            ids = [t.trial_id for t in trials]
            before = getattr(self, "done_before", 0)
            self.numbers[trial.trial_id] = (
                ids.index(trial.trial_id) + 1 + before
                if trial.trial_id in ids
                else max(self.numbers.values(), default=before) + 1
            )
        return f"trial {self.numbers[trial.trial_id]}/{self.total}"

    def _progress(self, trials) -> None:
        done = len(self.outcomes) + getattr(self, "done_before", 0)
        early = sum(o == "stopped early" for o in self.outcomes.values())
        failed = sum(o == "failed" for o in self.outcomes.values())
        # a trial whose end is being reported still shows RUNNING in Tune's list
        running = sum(t.status == Trial.RUNNING and t.trial_id not in self.outcomes for t in trials)
        elapsed = time.time() - self.start
        say(
            f"progress: {done}/{self.total} trials done ({early} stopped early, {failed} failed), "
            f"{running} running, elapsed {_fmt_time(elapsed)}, ETA {self._eta(elapsed, done)}"
        )

    def _eta(self, elapsed: float, done: int) -> str:
        """Epochs left at the rate epochs have been trained so far (all slots together). Every
        epoch a trial could still train is counted, so under an early-stopping scheduler this
        is an upper bound."""
        if done >= self.total:
            return _fmt_time(0)
        epochs = sum(self.epochs.values())
        if not epochs:
            return "unknown"
        unfinished = [t for t in self.numbers if t not in self.outcomes]
        left = sum(self.max_epochs - self.epochs.get(t, 0) for t in unfinished)
        started = len(self.numbers) + getattr(self, "done_before", 0)
        left += (self.total - started) * self.max_epochs  # trials not started yet
        bound = "~" if self.study.cfg.scheduler.type == "fifo" else "<="
        return bound + _fmt_time(elapsed / epochs * left)

    # ------------------------------------------------------------ Tune hooks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.start = self.last_status = time.time()
        try:  # Tune's own trial table, printed here at a calm interval
            from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter

            table: Any = TuneTerminalReporter(
                AirVerbosity.DEFAULT,
                num_samples=self.total,
                metric=self.metric,
                mode=self.study.cfg.mode,
                config=tune_space(self.study),
            )
            table.setup(start_time=self.start, total_samples=self.total)
            # this callback keeps the interval; the columns are not a result's first 4 keys
            ray_private.calm_trial_table(table, ["epoch", self.metric, "train_loss"])
            self.table = table
        except Exception:  # an internal Ray API: without it the progress lines remain
            self.table = None

    def _best(self, trial) -> float | None:
        """The trial's best value, as Tune keeps it over its results (the trial logger keeps the
        best with its checkpoint; this console keeps nothing of its own)."""
        analysis = (getattr(trial, "metric_analysis", None) or {}).get(self.metric) or {}
        value = analysis.get(self.study.cfg.mode)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def on_trial_start(self, iteration, trials, trial, **info):
        params = {k: trial.config[k] for k in self.study.cfg.search_space if k in trial.config}
        shown = ", ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in params.items())
        say(f"{self._label(trial, trials)} started: {shown}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self.epochs[trial.trial_id] = epoch
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        if RACE_KEY in result:  # a racing point's batch: its mean over the seeds trained so far
            say(f"{self._label(trial, trials)} {result[RACE_KEY]} seeds: {self.metric} {shown} (mean at epoch {epoch})")
            return
        say(
            f"{self._label(trial, trials)} epoch {epoch}/{self.max_epochs}: {self.metric} {shown} "
            f"(train {result.get('time_train_s', 0.0):.1f} s, eval {result.get('time_eval_s', 0.0):.1f} s)"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = self.epochs.get(trial.trial_id, 0)
        best = self._best(trial)
        best_text = f"best {self.metric} {best:.4f}" if best is not None else f"no {self.metric}"
        racing, last = self.study.cfg.racing, trial.last_result or {}
        raced = last.get(RACE_KEY, last.get("seeds"))  # stopped at its first batch's last epoch: "seeds"
        if racing is not None and raced is not None and epochs >= self.max_epochs:
            raced, value = int(raced), last.get(self.metric)
            mean = f"{self.metric} {value:.4f} over {raced} seeds" if isinstance(value, (int, float)) else "-"
            stopped = raced < racing.max_seeds
            self.outcomes[trial.trial_id] = "stopped early" if stopped else "finished"
            ended = "stopped by racing" if stopped else "finished"
            say(f"{self._label(trial, trials)} {ended} after {raced} seeds: {mean}")
        elif epochs >= self.max_epochs:
            self.outcomes[trial.trial_id] = "finished"
            say(f"{self._label(trial, trials)} finished {epochs} epochs: {best_text}")
        else:
            self.outcomes[trial.trial_id] = "stopped early"
            say(
                f"{self._label(trial, trials)} stopped early by {self.study.cfg.scheduler.type} after epoch "
                f"{epochs}: {best_text}"
            )
        self._progress(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.outcomes[trial.trial_id] = "failed"
        epoch = self.epochs.get(trial.trial_id, 0)
        say(f"{self._label(trial, trials)} failed after epoch {epoch}: {trial_error(trial)}")
        self._progress(trials)

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last_status < self.status_every_s:
            return
        self.last_status = time.time()
        if self.table is not None:
            print("", flush=True)
            self.table.print_heartbeat(trials)
            print("", flush=True)
        self._progress(trials)

    def on_experiment_end(self, trials, **info):
        if self.table is not None:
            print("", flush=True)
            self.table.print_heartbeat(trials, force=True)
            print("", flush=True)
