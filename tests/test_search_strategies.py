"""The search's noise handling: the racing rule on a deterministic objective, the replay of
recorded trainings (each evaluation returns a recorded curve exactly), the sampler choices
and their bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from pisa.core.objective import Objective
from pisa.search.racing import RacingRule
from pisa.search.replay import PAPER, Strategy, load_grid, run, search_with_trials

UP = Objective("bbox_mAP", "max")
T80_DF1 = math.tan(math.pi * 0.3)  # Student's t, 1 degree of freedom, is Cauchy: q(0.8) = tan(0.3 pi)


def _race(rule: RacingRule, base: float, incumbent: dict[int, float], noise: dict[int, float]) -> tuple[str, int]:
    """Race one point whose seed s scores base + noise[s]; its decision and seeds trained."""
    values: dict[int, float] = {}
    decision = "more"
    while decision == "more":
        for s in range(len(values), max(rule.min_seeds, len(values) + 1)):
            values[s] = base + noise[s]
        decision = rule.decide(values, incumbent, UP)
    return decision, len(values)


NOISE = {0: 0.0, 1: 0.02, 2: -0.01, 3: 0.01}  # the same per seed for every point: paired
INCUMBENT = {s: 0.50 + n for s, n in NOISE.items()}


def test_a_point_known_to_be_worse_is_stopped_after_the_first_batch():
    # diffs -0.10 on both seeds: sd 0, so behind at once
    assert _race(RacingRule(2, 4), 0.40, INCUMBENT, NOISE) == ("stop", 2)


def test_a_point_known_to_be_better_gets_every_seed():
    assert _race(RacingRule(2, 4), 0.60, INCUMBENT, NOISE) == ("done", 4)


def test_the_stop_is_the_one_sided_paired_bound_by_hand():
    rule = RacingRule(2, 4, confidence=0.8)
    # diffs -0.03 and -0.01: mean -0.02, sd sqrt(2)*0.01, upper = -0.02 + q * sd / sqrt(2) = -0.02 + q * 0.01
    point = {0: 0.47, 1: 0.51}
    incumbent = {0: 0.50, 1: 0.52}
    upper = -0.02 + T80_DF1 * 0.01
    assert upper < 0  # q(0.8, 1) = 1.376: the bound is -0.0062
    assert rule.decide(point, incumbent, UP) == "stop"
    # the same gap at 90% (q = 3.078) is not enough evidence: more seeds
    assert -0.02 + math.tan(math.pi * 0.4) * 0.01 > 0
    assert RacingRule(2, 4, confidence=0.9).decide(point, incumbent, UP) == "more"


def test_the_first_point_and_a_lower_is_better_metric():
    assert RacingRule(2, 3).decide({0: 0.1, 1: 0.2}, None, UP) == "more"
    down = Objective("loss", "min")
    assert RacingRule(2, 3).decide({0: 0.9, 1: 0.95}, {0: 0.5, 1: 0.52}, down) == "stop"


def test_racing_bounds_are_checked():
    with pytest.raises(ValueError, match="min_seeds <= max_seeds"):
        RacingRule(3, 2)
    with pytest.raises(ValueError, match="2 <= min_seeds"):
        RacingRule(1, 4)


# ---------------------------------------------------------------- the replay


def _grid_csv(path: Path) -> dict[tuple[str, int], list[float]]:
    """A 2 x 2 grid (the paper's point among them) on 2 seeds, 4 epochs each, every value
    distinct; and the baseline. Returns the recorded curves."""
    curves: dict[tuple[str, int], list[float]] = {}
    fields = ["schedule", "point", "isr_p_k", "carl_k", "seed", "epoch", "epochs", "bbox_mAP"]
    fields += ["train_loss", "time_train_s", "time_eval_s", "wall_s"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        points = [("baseline", "", "")] + [(f"isr{i:g}_carl{c:g}", i, c) for i in (1.0, 2.0) for c in (1.0, 2.0)]
        for n, (point, isr, carl) in enumerate(points):
            for seed in (0, 1):
                curve = [round(0.01 * (n + 1) + 0.1 * e + 0.001 * seed, 6) for e in range(4)]
                curves[(point, seed)] = curve
                for e, value in enumerate(curve, 1):
                    writer.writerow(
                        {
                            "schedule": "full",
                            "point": point,
                            "isr_p_k": isr,
                            "carl_k": carl,
                            "seed": seed,
                            "epoch": e,
                            "epochs": 4,
                            "bbox_mAP": value,
                            "train_loss": 1.0,
                            "time_train_s": 1.0 + n,
                            "time_eval_s": 0.5,
                            "wall_s": 0.0,
                        }
                    )
    return curves


def test_the_replay_returns_the_recorded_curves_exactly(tmp_path):
    curves = _grid_csv(tmp_path / "grid.csv")
    grid = load_grid(tmp_path / "grid.csv")
    assert grid.seeds == [0, 1] and PAPER in grid.params
    strategy = Strategy("fifo", sampler="random", num_samples=6, parallel=2)
    trials, epochs, wall = search_with_trials(strategy, grid, rep=0)
    assert len(trials) == 6 and epochs == 6 * 4
    assert trials[0].point == PAPER  # the paper's defaults are evaluated first
    for number, run_ in trials.items():
        recorded = curves[(run_.point, run_.seed)]
        told = run_.trial.study.trials[number]  # what Optuna holds of it
        assert [told.intermediate_values[e] for e in (1, 2, 3, 4)] == recorded
        assert told.value == recorded[-1] and run_.best == max(recorded)
    assert wall > 0


def test_asha_in_the_replay_stops_trials_at_its_rung(tmp_path):
    _grid_csv(tmp_path / "grid.csv")
    grid = load_grid(tmp_path / "grid.csv")
    strategy = Strategy("asha", sampler="random", scheduler="asha", grace_period=1, num_samples=8, parallel=1)
    trials, epochs, _ = search_with_trials(strategy, grid, rep=3)
    stopped = [r for r in trials.values() if r.epoch < 4]
    assert stopped and epochs == sum(r.epoch for r in trials.values()) < 8 * 4


def test_a_validated_answer_never_claims_a_worse_point(tmp_path):
    _grid_csv(tmp_path / "grid.csv")
    grid = load_grid(tmp_path / "grid.csv")
    means = {p: grid.seed_mean(p) for p in grid.params}
    strategy = Strategy("validated", sampler="tpe", num_samples=4, validation_seeds=2)
    for rep in range(5):
        outcome = run(strategy, grid, rep)
        if outcome.claims_better:
            assert means[outcome.recommended] > means[PAPER]


# ---------------------------------------------------------------- the study file


def test_samplers_are_built_with_explicit_options():
    import optuna

    from pisa.search.samplers import build_sampler, startup_trials
    from pisa.search.schema import SearcherConfig

    assert startup_trials(SearcherConfig(), 8) == 2 and startup_trials(SearcherConfig(), 24) == 6
    assert startup_trials(SearcherConfig(startup_trials=5), 8) == 5
    tpe = build_sampler(SearcherConfig(), num_samples=8, parallel=2, seed=0)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert tpe._n_startup_trials == 2 and tpe._multivariate and tpe._constant_liar  # noqa: SLF001
    solo = build_sampler(SearcherConfig(), num_samples=8, parallel=1, seed=0)
    assert not solo._constant_liar  # noqa: SLF001
    assert isinstance(
        build_sampler(SearcherConfig(sampler="gp"), num_samples=8, parallel=1, seed=0), optuna.samplers.GPSampler
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"searcher": {"sampler": "cmaes"}}, "searcher.sampler"),
        ({"searcher": {"startup_trials": 9}}, "searcher.startup_trials: 9 is more than num_samples (4)"),
        ({"validation": {"top": 5}}, "validation.top: 5 is more than num_samples (4)"),
        ({"validation": {"seeds": 1}}, "validation.seeds"),
        ({"scheduler": {"type": "asha", "grace_period": 3}}, "scheduler.grace_period: 3 is past the last epoch (2)"),
        ({"scheduler": {"type": "fifo"}, "racing": {"min_seeds": 3, "max_seeds": 2}}, "racing.max_seeds: "),
        ({"racing": {"min_seeds": 2}}, "scheduler.type: racing stops points by their seeds"),
        ({"scheduler": {"type": "fifo"}, "racing": {}, "seeds": 2}, "seeds: 2 with racing"),
        ({"scheduler": {"type": "fifo"}, "racing": {}, "budget": {"hours": 1}}, "budget: a budget counts"),
    ],
)
def test_bad_search_settings_are_one_line_naming_the_file_and_field(tmp_path, synthetic_dir, capsys, extra, message):
    import yaml
    from helpers import write_study

    from pisa.cli import main

    path = write_study(tmp_path, synthetic_dir, "bad")
    spec = yaml.safe_load(path.read_text())
    spec.update(extra)
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(path.name) in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


# ---------------------------------------------------------------- racing in a real Tune run
# Each point's final value per seed (2 epochs; epoch 1 is half of it). Raced with min 2, max 4
# seeds at 80%, one trial at a time in this order, the incumbent is always "first" (the one
# point before "better" to finish all its seeds). By hand, against "first" (0.50 .52 .51 .53):
# - "worse": diffs -0.20, -0.21: the one-sided bound is far below 0: stopped after 2 seeds;
# - "close": diffs +0.01, -0.03: mean -0.010, sd 0.0283, bound -0.010 + 1.376 x 0.0283 / sqrt 2
#   = +0.018: one more seed; with -0.03: mean -0.0167, sd 0.0231, bound -0.0167 + 1.061 x
#   0.0231 / sqrt 3 = -0.0025 < 0: stopped after 3 seeds;
# - "better": diffs +0.10 and up: every seed.
RACE_VALUES = {
    "first": [0.50, 0.52, 0.51, 0.53],
    "worse": [0.30, 0.31, 0.29, 0.30],
    "close": [0.51, 0.49, 0.48, 0.60],
    "better": [0.60, 0.61, 0.62, 0.63],
}
RACE_EPOCHS = 2


def _lookup_race_trial(config, log_dir: str) -> None:
    """A Tune trainable that races a point's recorded seeds through `race_point` (each seed's
    epoch values from RACE_VALUES; each training recorded in `log_dir`)."""
    from ray import tune

    from pisa.trials.race import race_point
    from pisa.trials.seeds import mean_report

    point = config["x"]

    def train(batch, report_epochs, on_report):
        for seed in batch:
            with open(Path(log_dir) / "trained.txt", "a") as f:
                f.write(f"{point} {seed}\n")
        for epoch in range(1, RACE_EPOCHS + 1):
            items = {s: {"epoch": epoch, "m": RACE_VALUES[point][s] * epoch / RACE_EPOCHS} for s in batch}
            for seed, item in items.items():
                on_report(seed, item)
            if report_epochs:
                tune.report(mean_report(items, "m"))

    race_file = str(Path(log_dir) / point / "race.json")
    race_point([0, 1, 2, 3], 2, RACE_EPOCHS, "m", race_file, train, tune.report)


def test_racing_stops_the_points_the_rule_says_in_a_real_tune_run_and_tells_optuna_pruned(ray_local, tmp_path):
    import sys

    import optuna
    from ray import cloudpickle, tune

    from pisa.search.optuna_storage import PruningOptunaSearch
    from pisa.search.race_scheduler import RacingScheduler

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trials' processes lack tests/
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = PruningOptunaSearch(
        space={"x": optuna.distributions.CategoricalDistribution(list(RACE_VALUES))},
        points_to_evaluate=[{"x": x} for x in RACE_VALUES],
        study_name="race",
        storage=optuna.storages.RDBStorage(url),
        metric="m",
        mode="max",
        max_t=RACE_EPOCHS,
        max_seeds=4,
    )
    tuner = tune.Tuner(
        tune.with_parameters(_lookup_race_trial, log_dir=str(tmp_path)),
        tune_config=tune.TuneConfig(
            search_alg=tune.search.ConcurrencyLimiter(searcher, max_concurrent=1),
            scheduler=RacingScheduler(RacingRule(2, 4, 0.8), Objective("m", "max"), RACE_EPOCHS),
            num_samples=len(RACE_VALUES),
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="race", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors

    trained: dict[str, list[int]] = {}
    for line in (tmp_path / "trained.txt").read_text().splitlines():
        point, seed = line.split()
        trained.setdefault(point, []).append(int(seed))
    # a stopped point never starts its next seed: Tune hands over a result only after the decision
    assert trained == {"first": [0, 1, 2, 3], "worse": [0, 1], "close": [0, 1, 2], "better": [0, 1, 2, 3]}

    record = {t.params["x"]: t for t in optuna.load_study(study_name="race", storage=url).trials}
    state = optuna.trial.TrialState
    assert record["first"].state == state.COMPLETE and record["first"].value == pytest.approx(0.515)
    assert record["better"].state == state.COMPLETE and record["better"].value == pytest.approx(0.615)
    assert record["worse"].state == state.PRUNED and record["worse"].user_attrs["stopped_at_seeds"] == 2
    assert record["close"].state == state.PRUNED and record["close"].user_attrs["stopped_at_seeds"] == 3
    # every epoch of the first batch once, as an intermediate value (the batch ends repeat the last)
    assert record["worse"].intermediate_values == pytest.approx({1: 0.1525, 2: 0.305})


def test_a_restarted_race_trains_only_the_seeds_without_a_result(tmp_path):
    """A race killed after seed 2's training: seeds 0-2 are in its race file, so the restarted
    trial trains seed 3 alone, after reporting the first batches again for the scheduler."""
    import json

    from pisa.trials.race import RACE_KEY, race_point

    race_file = tmp_path / "race.json"
    race_file.write_text(json.dumps({str(s): {"epoch": 2, "m": 0.1 * (s + 1)} for s in range(3)}))
    trained, reports = [], []

    def train(batch, report_epochs, on_report):
        trained.append((batch, report_epochs))
        for seed in batch:
            on_report(seed, {"epoch": 2, "m": 0.4})

    race_point([0, 1, 2, 3], 2, 2, "m", str(race_file), train, reports.append)
    assert trained == [([3], False)]
    assert [r[RACE_KEY] for r in reports] == [2, 3, 4]
    assert reports[-1]["m"] == pytest.approx(0.25) and reports[-1]["seed_3/m"] == 0.4
    assert json.loads(race_file.read_text())["3"]["m"] == 0.4
