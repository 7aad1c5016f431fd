"""Search strategies replayed against real trainings: which one finds good PISA parameters,
says honestly whether they beat the paper's defaults, and at what cost?

The table is `benchmarks/data/search_grid.csv` (`search_grid.py`): the quickstart detector
trained on every point of a 5 x 5 grid over ISR-P k and CARL k, on 5 seeds, every epoch
recorded, with its decaying schedule (and a shortened one that also decays). A strategy
searches exactly that grid, through the objects the product builds: the product's `choice`
distributions, its Optuna sampler (`pisa.search.samplers.build_sampler`), Ray Tune's
`ASHAScheduler` (fed the recorded epochs), the paper's defaults evaluated first, Optuna told
PRUNED for a stopped trial, the product's paired statistics for the validation stage and
its racing rule (`pisa.search.racing`). Each evaluation of a point returns one recorded
seed's curve; trials run `parallel` at a time in simulated time (each epoch lasts what it
took when it was recorded).

Per strategy, over `--reps` repetitions (the searcher's seed and the seeds drawn):
- regret: the grid's best seed-mean final bbox_mAP minus that of the point it recommends;
- false-winner rate: it claims a point beats the paper's defaults when the grid's
  seed-means say it does not (Wilson 95% interval);
- power: it claims "better" and is right, when the grid has a point truly better;
- cost: trial-epochs (validation trainings included) and simulated wall time.
A strategy without a validation stage "claims" its best trial beats the paper's defaults
whenever that trial is not the paper's (what a single-seed ranking tells its reader).

    python benchmarks/bench_search.py --reps 200 --json benchmarks/data/bench_search.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pisa.search.racing import RacingRule  # noqa: E402
from pisa.search.replay import PAPER, Grid, Outcome, Strategy, load_grid, run, summarize  # noqa: E402

GRID_CSV = REPO / "benchmarks" / "data" / "search_grid.csv"

STRATEGIES = [
    # what the quickstart ran before: Optuna's TPE with its own defaults (10 random start-up
    # points), ASHA stopping at epoch 2 of 4, one seed per point, the best trial as the answer
    Strategy("old default: TPE(defaults) + ASHA, 8 trials", sampler="tpe-default", scheduler="asha", distinct=False),
    Strategy(
        "old default: TPE(defaults) + ASHA, 16 trials",
        sampler="tpe-default",
        scheduler="asha",
        num_samples=16,
        distinct=False,
    ),
    # samplers alone (FIFO, no validation): which finds good points
    Strategy("TPE (start-up 2, multivariate, liar), FIFO, 8 trials", sampler="tpe"),
    Strategy("GP (noisy), FIFO, 8 trials", sampler="gp"),
    Strategy("QMC, FIFO, 8 trials", sampler="qmc"),
    Strategy("random, FIFO, 8 trials", sampler="random"),
    Strategy("TPE + ASHA, 8 trials", sampler="tpe", scheduler="asha"),
    # with the validation stage: the answer says whether the point beats the paper's defaults
    Strategy("TPE, FIFO, 4 trials + validation 3 seeds", sampler="tpe", num_samples=4, validation_seeds=3),
    Strategy("TPE, FIFO, 6 trials + validation 3 seeds", sampler="tpe", num_samples=6, validation_seeds=3),
    Strategy("TPE, FIFO, 8 trials + validation 3 seeds", sampler="tpe", validation_seeds=3),
    Strategy("TPE + ASHA, 8 trials + validation 3 seeds", sampler="tpe", scheduler="asha", validation_seeds=3),
    Strategy("QMC, FIFO, 6 trials + validation 3 seeds", sampler="qmc", num_samples=6, validation_seeds=3),
    # seed racing: 2 seeds per point, up to 4 while it can still beat the incumbent
    Strategy("TPE racing 2-4 seeds, 6 points", sampler="tpe", num_samples=6, racing=RacingRule(2, 4)),
    # a cheaper fidelity that still decays: every point on the 2-epoch schedule, the best 2 on 4
    Strategy("TPE, short-schedule screen of 8, best 2 full + validation 3", screen_short=True, validation_seeds=3),
]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Median regret (bar: quartiles) against mean trial-epochs, one marker per strategy; a
    hollow marker for a strategy whose false-winner rate is above 5%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    for i, row in enumerate(rows):
        x, y = row["cost_mean"], row["regret_median"] * 100
        low, high = y - row["regret_q25"] * 100, row["regret_q75"] * 100 - y
        honest = row["false_winner"] <= 0.05
        colour = f"C{i % 10}"
        ax.errorbar(
            x,
            y,
            yerr=[[max(0.0, low)], [max(0.0, high)]],
            xerr=row["cost_sd"],
            fmt="o" if honest else "s",
            color=colour,
            mfc=colour if honest else "white",
            capsize=3,
            label=f"{row['strategy']} (false winner {row['false_winner']:.0%})",
        )
    ax.set_xlabel("cost: trial-epochs per study (mean, bar: sd)")
    ax.set_ylabel("regret: AP below the grid's best (median, bar: quartiles)")
    ax.set_title("Strategies replayed on the recorded grid (hollow: false-winner rate > 5%)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_GRIDS: dict[tuple[Path, int], Grid] = {}


def _one_thread() -> None:
    import torch  # GP's sampler fits with torch: one thread per process

    torch.set_num_threads(1)


def _run_rep(job: tuple[Strategy, Path, int, int]) -> Outcome:
    strategy, path, min_seeds, rep = job
    if (path, min_seeds) not in _GRIDS:
        _GRIDS[(path, min_seeds)] = load_grid(path, min_seeds)
    return run(strategy, _GRIDS[(path, min_seeds)], rep)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=GRID_CSV)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--only", help="run the strategies whose name contains this")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="regret against trial-epochs, one point per strategy (PNG)")
    parser.add_argument("--jobs", type=int, default=1, help="processes the repetitions are shared over")
    parser.add_argument("--min-seeds", type=int, default=5, help="seeds every point must have (a partial grid: fewer)")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid, args.min_seeds)
    means = {p: grid.seed_mean(p) for p in grid.params}
    ranked = sorted(means, key=lambda p: -means[p])
    print(
        f"grid: {len(grid.params)} points x seeds {grid.seeds}; best {ranked[0]} {means[ranked[0]]:.4f}, "
        f"paper defaults {means[PAPER]:.4f} (rank {ranked.index(PAPER) + 1}), baseline "
        f"{statistics.fmean(grid.values[('full', 'baseline', s)][-1] for s in grid.seeds):.4f}",
        flush=True,
    )
    rows = []
    for strategy in STRATEGIES:
        if args.only and args.only not in strategy.name:
            continue
        if strategy.screen_short and not grid.has("short"):
            print(f"skipped (no short-schedule recordings): {strategy.name}")
            continue
        t0 = time.perf_counter()
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
                outcomes = list(
                    pool.map(_run_rep, [(strategy, args.grid, args.min_seeds, r) for r in range(args.reps)])
                )
        else:
            outcomes = [run(strategy, grid, rep) for rep in range(args.reps)]
        row = summarize(strategy, outcomes, grid)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        fw = row["false_winner_ci"]
        print(
            f"{strategy.name:<60} regret median {row['regret_median'] * 100:.2f} AP "
            f"(mean {row['regret_mean'] * 100:.2f} +- {row['regret_se'] * 100:.2f}), false winner "
            f"{row['false_winner']:.1%} [{fw[0]:.1%}, {fw[1]:.1%}], power {row['power']:.1%}, "
            f"cost {row['cost_mean']:.1f} +- {row['cost_sd']:.1f} trial-epochs, wall {row['wall_mean_s'] / 60:.1f} min",
            flush=True,
        )
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps({"grid_seeds": grid.seeds, "means": means, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
