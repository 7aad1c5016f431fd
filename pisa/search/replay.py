"""Search strategies replayed against recorded trainings (a tabular benchmark, as HPO research
evaluates searchers: NAS-Bench-201, LCBench, YAHPO): every evaluation of a point returns one
recorded seed's per-epoch curve, through the objects a study builds — the study file's
`choice` distributions, its Optuna sampler (`samplers.build_sampler`), Ray Tune's
`ASHAScheduler` fed the recorded epochs, the paper's defaults evaluated first, PRUNED told to
Optuna for a stopped trial, the validation stage's paired statistics and the racing rule.
Trials run `parallel` at a time in simulated time (an epoch lasts what it took when it was
recorded). `benchmarks/bench_search.py` runs the strategies over many repetitions.

The table is a CSV with one row per (schedule, point, seed, epoch): `benchmarks/search_grid.py`
writes it for the quickstart detector over ISR-P k x CARL k."""

from __future__ import annotations

import csv
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..core.objective import Objective
from ..core.stats import paired, verdict
from .distinct import ask_distinct
from .racing import RacingRule
from .samplers import build_sampler
from .schema import Choice, SearcherConfig

KEYS = ("model.isr_p.k", "model.carl.k")
PAPER = "isr2_carl1"
OBJECTIVE = Objective("bbox_mAP", "max")


# ---------------------------------------------------------------- the recorded grid


@dataclass
class Grid:
    """Per schedule, point and seed: the per-epoch metric and seconds."""

    values: dict[tuple[str, str, int], list[float]]
    seconds: dict[tuple[str, str, int], list[float]]
    params: dict[str, tuple[float, float]]  # point -> (isr_p.k, carl.k)
    seeds: list[int]

    def point_of(self, isr: float, carl: float) -> str:
        return f"isr{isr:g}_carl{carl:g}"

    def seed_mean(self, point: str, schedule: str = "full") -> float:
        return statistics.fmean(self.values[(schedule, point, s)][-1] for s in self.seeds)

    def space(self) -> dict[str, Choice]:
        isr = sorted({p[0] for p in self.params.values()})
        carl = sorted({p[1] for p in self.params.values()})
        return {KEYS[0]: Choice(type="choice", values=isr), KEYS[1]: Choice(type="choice", values=carl)}

    def has(self, schedule: str) -> bool:
        return all((schedule, p, s) in self.values for p in self.params for s in self.seeds)


def load_grid(path: Path, min_seeds: int = 2) -> Grid:
    """The grid's complete trainings; seeds every point has on the full schedule."""
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    seconds: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    params: dict[str, tuple[float, float]] = {}
    epochs: dict[tuple[str, str, int], int] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (row["schedule"], row["point"], int(row["seed"]))
            values[key].append(float(row["bbox_mAP"]))
            seconds[key].append(float(row["time_train_s"]) + float(row["time_eval_s"]))
            epochs[key] = int(row["epochs"])
            if row["point"] != "baseline":
                params[row["point"]] = (float(row["isr_p_k"]), float(row["carl_k"]))
    complete = {k for k, v in values.items() if len(v) == epochs[k]}
    seeds = sorted(
        s
        for s in {k[2] for k in complete}
        if all(("full", p, s) in complete for p in params) and ("full", "baseline", s) in complete
    )
    if len(seeds) < min_seeds:
        raise SystemExit(f"{path}: only {len(seeds)} seed(s) complete for every point; need {min_seeds}")
    return Grid(
        {k: v for k, v in values.items() if k in complete},
        {k: v for k, v in seconds.items() if k in complete},
        params,
        seeds,
    )


# ---------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    name: str
    sampler: str = "tpe"  # "tpe-default": Optuna's TPESampler(seed) as the product built it before
    scheduler: str = "fifo"  # "asha": Ray's ASHAScheduler over epochs
    grace_period: int = 2
    num_samples: int = 8
    parallel: int = 2
    validation_seeds: int = 0  # 0: no validation stage
    racing: RacingRule | None = None
    screen_short: bool = False  # screen every point on the short (decaying) schedule first
    promote: int = 2  # points promoted to the full schedule after screening
    # a repeat of a trained point in the discrete space asked again (`distinct`), as studies do
    # now; False: kept and trained on another recorded seed, as the old default did
    distinct: bool = True

    def ask(self, study, dists):
        return ask_distinct(study, dists) if self.distinct else study.ask(dists)


@dataclass
class Outcome:
    recommended: str
    claims_better: bool
    trial_epochs: int
    wall_s: float


@dataclass
class _Running:
    trial: Any
    point: str
    seed: int
    epoch: int = 0
    best: float = -math.inf
    ns: Any = field(default_factory=lambda: SimpleNamespace(trial_id=""))


# the Tune controller a scheduler's callbacks take: ASHA reads nothing of it, and outside Tune there is none
NO_CONTROLLER: Any = None


def _sampler(strategy: Strategy, rep: int):
    import optuna

    if strategy.sampler == "tpe-default":
        return optuna.samplers.TPESampler(seed=rep)  # what OptunaSearch(seed=...) built
    cfg = SearcherConfig(sampler=strategy.sampler)
    return build_sampler(cfg, num_samples=strategy.num_samples, parallel=strategy.parallel, seed=rep)


def _study(strategy: Strategy, grid: Grid, rep: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=OBJECTIVE.direction, sampler=_sampler(strategy, rep))
    space = grid.space()
    paper = grid.params[PAPER]
    study.enqueue_trial(
        {KEYS[0]: space[KEYS[0]].optuna_value(paper[0]), KEYS[1]: space[KEYS[1]].optuna_value(paper[1])}
    )
    return study, {k: d.optuna_distribution() for k, d in space.items()}


def _point(trial, grid: Grid) -> str:
    return grid.point_of(float(trial.params[KEYS[0]]), float(trial.params[KEYS[1]]))


def search_with_trials(strategy: Strategy, grid: Grid, rep: int, schedule: str = "full") -> tuple[dict, int, float]:
    """The trials of one search, `parallel` at a time in simulated time: each trial's best
    value and point and seed; trial-epochs; wall seconds."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    rng = random.Random(10_000 + rep)
    study, dists = _study(strategy, grid, rep)
    max_t = len(grid.values[(schedule, PAPER, grid.seeds[0])])
    scheduler = None
    if strategy.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch", metric="bbox_mAP", mode="max", max_t=max_t, grace_period=strategy.grace_period
        )
    events: list[tuple[float, int, _Running]] = []
    done: dict[int, _Running] = {}
    now, launched, epochs, counter = 0.0, 0, 0, 0

    def launch() -> None:
        nonlocal launched, counter
        trial = strategy.ask(study, dists)
        run = _Running(trial, _point(trial, grid), rng.choice(grid.seeds))
        run.ns.trial_id = str(trial.number)
        if scheduler is not None:
            scheduler.on_trial_add(NO_CONTROLLER, run.ns)
        launched += 1
        counter += 1
        events.append((now + grid.seconds[(schedule, run.point, run.seed)][0], counter, run))

    while events or launched < strategy.num_samples:
        while len(events) < strategy.parallel and launched < strategy.num_samples:
            launch()
        events.sort(key=lambda e: (e[0], e[1]))
        now, _, run = events.pop(0)
        value = grid.values[(schedule, run.point, run.seed)][run.epoch]
        run.epoch += 1
        epochs += 1
        run.best = max(run.best, value)
        run.trial.report(value, run.epoch)
        action = TrialScheduler.CONTINUE
        if scheduler is not None:
            action = scheduler.on_trial_result(NO_CONTROLLER, run.ns, {"epoch": run.epoch, "bbox_mAP": value})
        if run.epoch >= max_t or action == TrialScheduler.STOP:
            if run.epoch < max_t:
                study.tell(run.trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(run.trial, value)
            done[run.trial.number] = run
        else:
            counter += 1
            events.append((now + grid.seconds[(schedule, run.point, run.seed)][run.epoch], counter, run))
    return done, epochs, now


def validate(point: str, used: set[int], grid: Grid, n: int, rng: random.Random) -> tuple[str, bool, int, float]:
    """The product's validation stage: the point and the paper's defaults on `n` fresh seeds,
    paired; recommended is the point when the interval says better, else the paper's."""
    if point == PAPER:
        return PAPER, False, 0, 0.0
    fresh = [s for s in grid.seeds if s not in used] or list(grid.seeds)
    seeds = rng.sample(fresh, min(n, len(fresh)))
    mine = {s: grid.values[("full", point, s)][-1] for s in seeds}
    paper = {s: grid.values[("full", PAPER, s)][-1] for s in seeds}
    said = verdict(paired(mine, paper, mode="max"), "max")
    cost = 2 * len(seeds) * len(grid.values[("full", PAPER, seeds[0])])
    # 2 x len(seeds) trainings, two side by side: len(seeds) waves of a mean training each
    wall = len(seeds) * statistics.fmean(sum(grid.seconds[("full", p, s)]) for p in (point, PAPER) for s in seeds)
    return (point if said == "better" else PAPER), said == "better", cost, wall


def run_plain(strategy: Strategy, grid: Grid, rep: int) -> Outcome:
    rng = random.Random(20_000 + rep)
    if strategy.screen_short:
        screened, cost, wall = search_with_trials(strategy, grid, rep, schedule="short")
        top = sorted(screened.values(), key=lambda r: -r.best)[: strategy.promote]
        full = [(grid.values[("full", r.point, r.seed)][-1], r) for r in top]
        cost += sum(len(grid.values[("full", r.point, r.seed)]) for r in top)
        wall += max(sum(grid.seconds[("full", r.point, r.seed)]) for r in top)
        best = max(full, key=lambda x: x[0])[1]
    else:
        trials, cost, wall = search_with_trials(strategy, grid, rep)
        best = max(trials.values(), key=lambda r: r.best)  # the product ranks by a trial's best epoch
    if strategy.validation_seeds:
        used = {best.seed}
        recommended, claims, v_cost, v_wall = validate(best.point, used, grid, strategy.validation_seeds, rng)
        return Outcome(recommended, claims, cost + v_cost, wall + v_wall)
    return Outcome(best.point, best.point != PAPER, cost, wall)


def run_racing(strategy: Strategy, grid: Grid, rep: int) -> Outcome:
    """Seed racing (sequential points): each point on the same seed order, more seeds while
    the racing rule lets it; the incumbent is the best mean among finished points; its claim
    is the paired 95% interval against the paper's defaults on their common seeds."""
    import optuna

    rule = strategy.racing
    assert rule is not None
    study, dists = _study(strategy, grid, rep)
    order = list(grid.seeds)
    random.Random(30_000 + rep).shuffle(order)
    finished: dict[str, dict[int, float]] = {}
    cost, wall = 0, 0.0
    epochs = len(grid.values[("full", PAPER, order[0])])
    for _ in range(strategy.num_samples):
        trial = strategy.ask(study, dists)
        point = _point(trial, grid)
        values: dict[int, float] = {}
        incumbent = max(finished.values(), key=statistics.fmean) if finished else None
        decision = "more"
        while decision == "more":
            batch = order[len(values) : max(rule.min_seeds, len(values) + 1)]
            if not batch:
                decision = "done"
                break
            for s in batch:
                values[s] = grid.values[("full", point, s)][-1]
                cost += epochs
                wall += sum(grid.seconds[("full", point, s)]) / strategy.parallel
            decision = rule.decide(values, incumbent, OBJECTIVE)
        if decision == "stop":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, statistics.fmean(values.values()))
            finished[point] = values if point not in finished or len(values) > len(finished[point]) else finished[point]
    best = max(finished, key=lambda p: statistics.fmean(finished[p].values()))
    if best == PAPER or PAPER not in finished:
        return Outcome(best, False, cost, wall)
    said = verdict(paired(finished[best], finished[PAPER], mode="max"), "max")
    return Outcome(best if said == "better" else PAPER, said == "better", cost, wall)


def run(strategy: Strategy, grid: Grid, rep: int) -> Outcome:
    return run_racing(strategy, grid, rep) if strategy.racing else run_plain(strategy, grid, rep)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(strategy: Strategy, outcomes: list[Outcome], grid: Grid) -> dict[str, Any]:
    means = {p: grid.seed_mean(p) for p in grid.params}
    best_mean, paper_mean = max(means.values()), means[PAPER]
    regrets = [best_mean - means[o.recommended] for o in outcomes]
    false = sum(o.claims_better and means[o.recommended] <= paper_mean for o in outcomes)
    truly_better_exists = best_mean > paper_mean
    right = sum(o.claims_better and means[o.recommended] > paper_mean for o in outcomes)
    costs = [o.trial_epochs for o in outcomes]
    walls = [o.wall_s for o in outcomes]
    n = len(outcomes)
    return {
        "strategy": strategy.name,
        "reps": n,
        "regret_median": statistics.median(regrets),
        "regret_mean": statistics.fmean(regrets),
        "regret_se": statistics.stdev(regrets) / math.sqrt(n) if n > 1 else math.nan,
        "regret_q25": statistics.quantiles(regrets, n=4)[0] if n > 1 else math.nan,
        "regret_q75": statistics.quantiles(regrets, n=4)[2] if n > 1 else math.nan,
        "false_winner": false / n,
        "false_winner_ci": wilson(false, n),
        "power": right / n if truly_better_exists else math.nan,
        "power_ci": wilson(right, n) if truly_better_exists else (math.nan, math.nan),
        "cost_mean": statistics.fmean(costs),
        "cost_sd": statistics.stdev(costs) if n > 1 else 0.0,
        "wall_mean_s": statistics.fmean(walls),
        "wall_sd_s": statistics.stdev(walls) if n > 1 else 0.0,
        "recommended_paper": sum(o.recommended == PAPER for o in outcomes) / n,
    }
