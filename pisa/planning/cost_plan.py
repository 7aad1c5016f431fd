"""What a study will cost, known before anything trains (`pisa study plan`, and one line of
it when `pisa study run` starts): its trials and their layout, how many run at once, the
images an epoch trains on, a training rate, and from those the GPU- (or CPU-) hours and
wall time with FIFO and ASHA's bounds.

The arithmetic (`asha_segments`, `schedule_cost`, `make_plan`) is pure; `plan_study` and
`plan_at_start` gather its inputs: the cluster (`cluster_capacity`: assumed with `--gpus N`,
this machine for a local cluster, Ray's view of a joined one), the training set's size, and
the rate (`training_rate`: a probe on this machine's device, else an earlier run of the same
model in the MLflow store, else with `--gpu-type` a measured row of `benchmarks/data/rates.csv`
(`reference_rates`), else unknown; then everything that needs no rate is still given). The
training set's size comes from the annotation files alone (`dataset_size`): no image is opened.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..trials.capacity import footprint, trainings_that_fit
from . import reference_rates
from .cluster_capacity import Cluster, assumed_cluster, local_cluster, ray_cluster
from .dataset_size import SetSize, training_set_size
from .training_rate import Rate, rate_from_mlflow, rate_from_probe
from .workload import Workload

# What the epochs leave out, as a share of a study's wall time x its slots: each trial's
# start-up (its actor, data and model built), the checkpoints taken in, the driver's start and
# the slots left empty while the last trials end. Measured on the quickstart by bench_study
# (benchmarks/RESULTS.md): 13% (FIFO, 5 s epochs and more) to 24% (ASHA, whose trials end
# early and leave more start-ups and empty slots per epoch).
OVERHEAD = (0.13, 0.24)
OVERHEAD_SOURCE = "measured on the quickstart, benchmarks/RESULTS.md bench_study"


def with_overhead(wall_s: float, share: float) -> float:
    """A wall time of epochs alone, with the overhead's share of the whole added."""
    return wall_s / (1.0 - share)


# ---------------------------------------------------------------- the hand-offs


@dataclass(frozen=True)
class Cost:
    """One schedule's bill. `trial_epochs` needs no rate; hours and wall time do."""

    schedule: str  # "FIFO", "ASHA lower bound"
    trial_epochs: int
    wave_epochs: int  # epochs one after the other on the cluster, trials run in waves of `at_once`
    hours: float | None  # GPU- or CPU-hours (the study's kind), all seeds
    wall_s: float | None
    usd: float | None = None  # hours x `--price` (USD per GPU- or CPU-hour), when a price was given


@dataclass(frozen=True)
class Plan:
    """Everything `pisa study plan` prints, and the one line `pisa study run` starts with."""

    study: str
    source: str
    num_samples: int
    search_keys: list[str]
    seeds: int
    workers: int
    images_per_worker: int
    kind: str  # "GPU" or "CPU": what a worker holds, and what the hours are of
    per_worker: float  # GPUs (or CPUs) per worker
    cluster: Cluster
    at_once: int  # trials at a time
    epochs: int
    images_per_epoch: int  # the training set after `data.train_limit`
    iters_per_epoch: int  # optimizer steps of each worker
    scheduler: str  # "asha" or "fifo"
    rungs: list[int]  # ASHA's rungs (epochs) before the last epoch
    fifo: Cost
    asha: Cost | None  # the lower bound; the upper is `fifo` (no trial stopped)
    rate: Rate | None
    rate_note: str = ""  # why there is no rate
    notes: list[str] = field(default_factory=list)
    layout_note: str = ""  # `pack: auto`: the layout it replaced, or that it kept the given one
    images_source: str = ""  # where `images_per_epoch` came from (the annotation file, a known set, --images)
    price: float | None = None  # USD per GPU- (or CPU-) hour, `--price`
    overhead: tuple[float, float] = OVERHEAD  # share of the wall not in the epochs (`OVERHEAD`)
    # the validation stage after the search: at most `validation_points` x `validation_seeds`
    # trainings of every epoch, one training each (None: the study has none)
    validation: Cost | None = None
    validation_points: int = 0
    validation_seeds: int = 0
    race_seeds: int = 0  # racing: a point's seeds at most (`seeds` of them side by side); 0: none

    def wall_range(self) -> tuple[float, float] | None:
        """The wall time the study should take, overhead included: from ASHA's lower bound (FIFO
        without ASHA) at the lower overhead to FIFO at the higher; None without a rate."""
        low = self.asha if self.asha is not None else self.fifo
        if low.wall_s is None or self.fifo.wall_s is None:
            return None
        return with_overhead(low.wall_s, self.overhead[0]), with_overhead(self.fifo.wall_s, self.overhead[1])

    @property
    def validation_trainings(self) -> int:
        """The validation stage's trainings, at most (fewer when the best point is the paper's defaults)."""
        return self.validation_points * self.validation_seeds

    def total_hours(self) -> tuple[float, float] | None:
        """GPU- (CPU-) hours of the search (ASHA's lower bound to FIFO) and its validation stage."""
        low = self.asha if self.asha is not None else self.fifo
        if low.hours is None or self.fifo.hours is None:
            return None
        extra = (self.validation.hours or 0.0) if self.validation is not None else 0.0
        return low.hours + extra, self.fifo.hours + extra

    def total_wall_range(self) -> tuple[float, float] | None:
        """`wall_range` with the validation stage's wall (and the same overhead) added."""
        search = self.wall_range()
        if search is None or self.validation is None or self.validation.wall_s is None:
            return search
        lo, hi = self.overhead
        return search[0] + with_overhead(self.validation.wall_s, lo), search[1] + with_overhead(
            self.validation.wall_s, hi
        )

    @property
    def batch(self) -> int:
        return self.workers * self.images_per_worker

    @property
    def epoch_s(self) -> float | None:
        """Seconds of one epoch: the images every worker trains (its shard, padded as the
        DistributedSampler pads it) at the rate, plus evaluation when the rate's source timed it."""
        if self.rate is None:
            return None
        return epoch_seconds(self.images_per_epoch, self.workers, self.rate)

    def _seed_words(self) -> str:
        if self.race_seeds > self.seeds:
            return f" x {self.seeds}-{self.race_seeds} seeds (raced; priced at {self.race_seeds})"
        return f" x {self.seeds} seeds" if self.seeds > 1 else ""

    def line(self) -> str:
        """The plan in one line (what `pisa study run` prints and logs)."""
        head = (
            f"plan: {self.num_samples} trials x {self.epochs} epochs"
            f"{self._seed_words()}, {self.at_once} at a time, "
            f"{self.images_per_epoch} images/epoch ({self.iters_per_epoch} iters)"
        )
        if self.rate is None:
            asha = f", ASHA {self.asha.trial_epochs}-{self.fifo.trial_epochs}" if self.asha else ""
            return (
                f"{head}; {self.fifo.trial_epochs} trial-epochs (FIFO){asha}{self._validation_words()}; "
                f"rate unknown ({self.rate_note})"
            )
        wall = {c.schedule: "?" if c.wall_s is None else f"~{fmt_wall(c.wall_s)}" for c in (self.fifo, self.asha) if c}
        money = {c.schedule: "" if c.usd is None else f" (~{fmt_usd(c.usd)})" for c in (self.fifo, self.asha) if c}
        cost = f"~{fmt_hours(self.fifo.hours)} {self.kind}-hours{money['FIFO']}, {wall['FIFO']} wall (FIFO)"
        if self.asha is not None:
            usd = "" if self.asha.usd is None else f" (~{fmt_usd(self.asha.usd)}-{fmt_usd(self.fifo.usd)})"
            cost += (
                f", ASHA ~{fmt_hours(self.asha.hours)}-{fmt_hours(self.fifo.hours)} {self.kind}-hours{usd}, "
                f"{wall[self.asha.schedule]}-{wall['FIFO']} wall"
            )
        rate = f"rate {self.rate.images_per_sec:.3g} img/s from {self.rate.source}"
        return f"{head}; {cost}{self._validation_words()}; {rate}"

    def _validation_words(self) -> str:
        v = self.validation
        if v is None:
            return ""
        bill = "" if v.hours is None else f", ~{fmt_hours(v.hours)} {self.kind}-hours"
        wall = "" if v.wall_s is None else f", ~{fmt_wall(v.wall_s)} wall"
        usd = "" if v.usd is None else f" (~{fmt_usd(v.usd)})"
        return f"; then validation <= {self.validation_trainings} trainings{bill}{usd}{wall}"

    def text(self) -> str:
        """The plan as a short block of two plain-text tables (what `pisa study plan` prints)."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        res = "GPU" if self.kind == "GPU" else "CPU"
        facts = Table(title=f"study {self.study} ({self.source})", show_header=False, box=None, title_justify="left")
        facts.add_column(style="bold")
        facts.add_column()
        seeds = f"{self._seed_words()} each" if self.seeds > 1 or self.race_seeds else ""
        facts.add_row("trials", f"{self.num_samples}{seeds}; searching {', '.join(self.search_keys)}")
        facts.add_row(
            "per trial",
            f"{self.workers} worker(s) x {self.images_per_worker} images = batch {self.batch}; "
            f"{self.per_worker:g} {res}(s) per worker" + (f"; {self.layout_note}" if self.layout_note else ""),
        )
        facts.add_row("at once", f"{self.at_once} trial(s), on {self.cluster.where}")
        facts.add_row(
            "epoch",
            f"{self.images_per_epoch} images, {self.iters_per_epoch} iterations per worker; {self.epochs} epochs"
            + (f"; ASHA rungs at epochs {', '.join(map(str, self.rungs))}" if self.scheduler == "asha" else ""),
        )
        if self.images_source:
            facts.add_row("images", self.images_source)
        if self.rate is not None and self.epoch_s is not None:
            ev = (
                "evaluation not included"
                if self.rate.eval_s is None
                else f"{self.epoch_s - self.rate.eval_s:.3g} s training + {self.rate.eval_s:.3g} s evaluation"
            )
            facts.add_row("rate", f"{self.rate.images_per_sec:.3g} img/s per trial, from {self.rate.source}")
            facts.add_row("epoch time", f"~{fmt_seconds(self.epoch_s)} per trial ({ev})")
        else:
            facts.add_row("rate", f"unknown: {self.rate_note}")

        costs = Table(box=box.SIMPLE_HEAD)
        columns = ["schedule", "trial-epochs", "epochs in a row", f"{self.kind}-hours", "wall"]
        if self.price is not None:
            columns.append(f"USD at {self.price:g}/{self.kind}-hour")
        for name in columns:
            costs.add_column(name, justify="left" if name == "schedule" else "right")
        rows = [self.fifo] if self.asha is None else [self.asha, self.fifo]
        if self.validation is not None:
            rows.append(self.validation)
        for cost in rows:
            label = "ASHA, upper bound = FIFO" if self.asha is not None and cost is self.fifo else cost.schedule
            if cost is self.validation:
                label = f"then validation, <= {self.validation_points} points x {self.validation_seeds} seeds"
            hours = "?" if cost.hours is None else f"~{fmt_hours(cost.hours)}"
            wall = "?" if cost.wall_s is None else f"~{fmt_wall(cost.wall_s)}"
            cells = [label, str(cost.trial_epochs), str(cost.wave_epochs), hours, wall]
            if self.price is not None:
                cells.append("?" if cost.usd is None else f"~{fmt_usd(cost.usd)}")
            costs.add_row(*cells)

        buf = io.StringIO()
        console = Console(file=buf, width=120, force_terminal=False, color_system=None)
        console.print(facts)
        console.print(costs)
        lo, hi = self.overhead
        with_it = self.wall_range()
        notes = [
            f"wall = epochs in a row (the trials run in waves of {self.at_once}) x the epoch time; "
            f"trial start-up, checkpoints and the driver are the overhead term, {lo:.0%}-{hi:.0%} of a study's "
            f"wall ({OVERHEAD_SOURCE})"
            + (f", ~{fmt_wall(with_it[0])}-{fmt_wall(with_it[1])} for the search" if with_it else ""),
            *self.notes,
        ]
        if self.validation is not None:
            total, walls = self.total_hours(), self.total_wall_range()
            in_all = []
            if total is not None:
                in_all.append(f"~{fmt_range(total, fmt_hours)} {self.kind}-hours")
            if walls is not None:
                in_all.append(f"~{fmt_range(walls, fmt_wall)} wall with the overhead")
            notes.insert(
                0,
                f"validation: after the search, its top {self.validation_points - 1} point(s) and the paper's "
                f"defaults train again on {self.validation_seeds} fresh seeds, one training each, every epoch "
                f"(fewer when the best point is the paper's defaults)"
                + (f"; search + validation {', '.join(in_all)}" if in_all else ""),
            )
        if self.asha is not None:
            notes.insert(0, "ASHA lower bound: every rung keeps only 1/reduction_factor of the trials reaching it")
        table = "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())
        return table + "".join(f"note: {n}\n" for n in notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "line": self.line(),
            "epoch_s": self.epoch_s,
            "wall_range_s": self.wall_range(),
            "validation_trainings": self.validation_trainings,
        }


# ---------------------------------------------------------------- the arithmetic


def asha_rungs(epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The epochs where ASHA may stop a trial: grace_period x reduction_factor^k (Ray's
    milestones, reached at the first whole epoch past them), before the last epoch."""
    rungs: list[int] = []
    milestone = float(min(grace_period, epochs))
    while math.ceil(milestone) < epochs:
        if not rungs or math.ceil(milestone) > rungs[-1]:
            rungs.append(math.ceil(milestone))
        milestone *= reduction_factor
    return rungs


def asha_segments(trials: int, epochs: int, grace_period: int, reduction_factor: float) -> list[tuple[int, int]]:
    """ASHA's least work: (trials, epochs) per segment between rungs, each rung keeping
    ceil(1/reduction_factor) of the trials that reach it."""
    segments, start, alive = [], 0, trials
    for rung in asha_rungs(epochs, grace_period, reduction_factor):
        segments.append((alive, rung - start))
        start, alive = rung, math.ceil(alive / reduction_factor)
    segments.append((alive, epochs - start))
    return segments


def schedule_cost(
    schedule: str,
    segments: list[tuple[int, int]],
    at_once: int,
    epoch_s: float | None,
    trial_footprint: float,
    price: float | None = None,
) -> Cost:
    """The bill of `segments` ((trials, epochs) each) with `at_once` trials at a time, each
    holding `trial_footprint` GPUs (or CPUs) for `epoch_s` seconds per epoch; in USD at
    `price` per GPU- (or CPU-) hour."""
    trial_epochs = sum(n * e for n, e in segments)
    waves = sum(math.ceil(n / at_once) * e for n, e in segments) if at_once > 0 else 0
    if epoch_s is None:
        return Cost(schedule, trial_epochs, waves, None, None)
    hours = trial_epochs * epoch_s * trial_footprint / 3600
    usd = None if price is None else hours * price
    return Cost(schedule, trial_epochs, waves, hours, waves * epoch_s if at_once > 0 else None, usd)


def _plus(first: Cost, then: Cost) -> Cost:
    """Two bills one after the other: `first`'s trial-epochs (a point's epochs), the sum of the rest."""

    def add(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a + b

    return Cost(
        first.schedule,
        first.trial_epochs,
        first.wave_epochs + then.wave_epochs,
        add(first.hours, then.hours),
        add(first.wall_s, then.wall_s),
        add(first.usd, then.usd),
    )


def epoch_seconds(images: int, workers: int, rate: Rate) -> float:
    """A training's epoch: every worker trains ceil(images / workers) images (the sampler pads
    the shards), at `rate` over all workers; plus evaluation when the rate's source timed it."""
    trained = workers * math.ceil(images / workers)
    return trained / rate.images_per_sec + (rate.eval_s or 0.0)


def iterations_per_epoch(images: int, workers: int, images_per_worker: int) -> int:
    return math.ceil(math.ceil(images / workers) / images_per_worker)


def trials_at_once(work: Workload, cluster: Cluster) -> int:
    """The study's limit, and no more points (of `seeds` trainings each) than the cluster
    holds at a time (`trials.capacity`), nor than the study has."""
    fit = trainings_that_fit(work.experiment.train, {"GPU": cluster.gpus, "CPU": cluster.cpus})
    return min(work.max_concurrent_trials, fit // work.seeds, work.num_samples)


def make_plan(
    work: Workload,
    cluster: Cluster,
    images: int,
    rate: Rate | None,
    rate_note: str = "",
    notes: list[str] | None = None,
    price: float | None = None,
    images_source: str = "",
) -> Plan:
    """The plan of `study` on `cluster`, for a training set of `images` at `rate`; the bill in
    USD too at `price` per GPU- (or CPU-) hour."""
    cfg, exp = work, work.experiment
    res = exp.train
    kind, per_training = footprint(work.experiment.train)
    epochs = exp.train.resolved().epochs
    at_once = trials_at_once(work, cluster)
    workers, ipw = exp.train.workers, exp.train.images_per_worker
    epoch_s = epoch_seconds(images, workers, rate) if rate is not None else None
    point_footprint = per_training * cfg.seeds  # a point trains its seeds side by side
    fifo = schedule_cost("FIFO", [(cfg.num_samples, epochs)], at_once, epoch_s, point_footprint, price)
    if work.race_seeds > work.seeds:  # every point raced to its last seed: the most it can cost
        later = [(cfg.num_samples, epochs * (work.race_seeds - work.seeds))]
        fifo = _plus(fifo, schedule_cost("FIFO", later, at_once, epoch_s, per_training, price))
    asha, rungs = None, []
    if work.scheduler == "asha":
        grace, rf = min(work.grace_period, epochs), work.reduction_factor
        rungs = asha_rungs(epochs, grace, rf)
        segments = asha_segments(cfg.num_samples, epochs, grace, rf)
        asha = schedule_cost("ASHA lower bound", segments, at_once, epoch_s, point_footprint, price)
    validation = None
    if work.validation_trainings > 0:  # one training per (point, seed), as many at once as the search ran
        fit = trainings_that_fit(exp.train, {"GPU": cluster.gpus, "CPU": cluster.cpus})
        v_at_once = max(1, min(work.validation_trainings, work.max_concurrent_trials * work.seeds, fit))
        v_jobs = [(work.validation_trainings, epochs)]
        validation = schedule_cost("validation", v_jobs, v_at_once, epoch_s, per_training, price)
    return Plan(
        study=work.name,
        source=_display_path(work.source),
        num_samples=cfg.num_samples,
        search_keys=list(cfg.search_keys),
        seeds=cfg.seeds,
        race_seeds=work.race_seeds,
        workers=workers,
        images_per_worker=ipw,
        kind=kind,
        per_worker=res.gpus_per_worker if kind == "GPU" else res.cpus_per_worker,
        cluster=cluster,
        at_once=at_once,
        epochs=epochs,
        images_per_epoch=images,
        iters_per_epoch=iterations_per_epoch(images, workers, ipw),
        scheduler=work.scheduler,
        rungs=rungs,
        fifo=fifo,
        asha=asha,
        rate=rate,
        rate_note=rate_note if rate is None else "",
        notes=[*packing_notes(work), *(notes or [])],
        layout_note=layout_note(work),
        images_source=images_source,
        price=price,
        validation=validation,
        validation_points=work.validation_points,
        validation_seeds=work.validation_seeds,
    )


def layout_note(work: Workload) -> str:
    """The "per trial" row's word on `pack: auto`."""
    packing = work.packing
    if packing is None:
        return ""
    if packing.packed:
        return f"packed from {packing.given.text()} (pack: auto, see the notes)"
    return "as given (pack: auto kept it, see the notes)"


def packing_notes(work: Workload) -> list[str]:
    """`pack: auto`: the layout chosen and why, or why the given one was kept."""
    return [] if work.packing is None else [work.packing.line()]


def _display_path(path: Path) -> str:
    """The study file as the user named it: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def fmt_hours(hours: float | None) -> str:
    if hours is None:
        return "?"
    return f"{hours:.0f}" if hours >= 10 else f"{hours:.1f}" if hours >= 1 else f"{hours:.2g}"


def fmt_range(bounds: tuple[float, float], fmt) -> str:
    """ "a-b", or "a" when both ends print alike."""
    low, high = fmt(bounds[0]), fmt(bounds[1])
    return low if low == high else f"{low}-{high}"


def fmt_usd(usd: float | None) -> str:
    """$1,072; $9.6; $0.41."""
    if usd is None:
        return "?"
    return f"${usd:,.0f}" if usd >= 100 else f"${usd:.3g}"


def fmt_wall(seconds: float) -> str:
    """h:mm, rounded up to the minute (a 20 s study is 0:01, not 0:00)."""
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}:{minutes % 60:02d}"


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 600 else fmt_wall(seconds)


# ---------------------------------------------------------------- the inputs


def training_images(work: Workload, images: int | None = None) -> SetSize:
    """The images of one epoch (after `data.skip_empty_train` and `data.train_limit`), counted
    from the train annotation file alone, else a standard set's known size, else `images`
    (`--images N`, which also overrides both): no image file is opened (`dataset_size`)."""
    return training_set_size(work.experiment.data, images)


def plan_study(
    work: Workload,
    *,
    gpus: int | None = None,
    address: str | None = None,
    probe: bool = False,
    images: int | None = None,
    gpu_type: str | None = None,
    price: float | None = None,
) -> Plan:
    """`pisa study plan`: the cluster (`--gpus N` assumed, else this machine or the cluster at
    `address`), the training set (`images`, else its annotation file, else a known set), and the
    rate (probed, else from MLflow, else with `gpu_type` the reference table, else unknown); the
    bill in USD too at `price` per GPU- (or CPU-) hour. Needs neither the images nor a GPU."""
    rows = reference_rates.read_rows() if gpu_type is not None else []
    if gpu_type is not None:
        gpu_type = reference_rates.check_gpu_type(gpu_type, rows)
    if gpus is not None:
        cluster = assumed_cluster(gpus)
    elif address is not None:
        cluster = ray_cluster(address)
    else:
        cluster = local_cluster()
    notes: list[str] = []
    kind, per_training = footprint(work.experiment.train)
    if trials_at_once(work, cluster) < 1:
        need = per_training * work.seeds
        message = (
            f"{work.source}: resources_per_trial: a trial needs {need:g} {kind}s"
            f"{f' ({work.seeds} seeds side by side)' if work.seeds > 1 else ''}; "
            f"{cluster.where} has {cluster.total(kind):g}"
        )
        if address is None:
            raise ConfigError(message)
        notes.append(f"{message}: the trials wait for more resources")
    if gpus is not None and kind == "CPU":
        notes.append("the trials train on CPUs: --gpus does not change how many run at once")
    size = training_images(work, images)
    rate, rate_note = (rate_from_probe(work), "") if probe else rate_from_mlflow(work)
    if gpu_type is not None:
        if kind == "CPU":
            notes.append(f"the trials train on CPUs: --gpu-type {gpu_type} is not used")
        elif rate is not None:
            notes.append(f"--gpu-type {gpu_type}: the reference table is not used, the rate comes from {rate.source}")
        else:
            rate, table_note, rate_notes = reference_rates.rate_from_table(work, gpu_type, rows)
            rate_note = f"{rate_note}; {table_note}" if rate is None else ""
            notes.extend(rate_notes)
    if rate is not None and rate.device == "cpu" and kind == "GPU":
        notes.append("the probe ran on this machine's CPU, the trials train on GPUs: their rate will differ")
    return make_plan(work, cluster, size.images, rate, rate_note, notes, price=price, images_source=size.source)


def plan_at_start(work: Workload, uri: str) -> Plan:
    """The plan `pisa study run` starts with: Ray's cluster (already started), the rate of an
    earlier run in the study's store; no probe (it would delay the first trial)."""
    rate, note = rate_from_mlflow(work, uri)
    size = training_images(work)
    return make_plan(work, ray_cluster(), size.images, rate, note, images_source=size.source)
