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
