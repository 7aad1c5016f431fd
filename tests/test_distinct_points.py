"""No point of a discrete search space trained twice: a repeat is told to Optuna without a
training (the recorded value, else FAIL) and the sampler is asked again."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from pisa.search.distinct import DUPLICATE_ATTR, ask_distinct, grid_size
from pisa.search.optuna_storage import PruningOptunaSearch

GRID = {"k": CategoricalDistribution([0.5, 1.0, 2.0]), "c": CategoricalDistribution([1.0, 2.0])}
PAPER = {"k": 2.0, "c": 1.0}


def _study(seed: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))


def test_grid_size_counts_categorical_points_only():
    assert grid_size(GRID) == 6
    assert grid_size({**GRID, "b": FloatDistribution(0.0, 1.0)}) is None


def test_a_repeat_of_a_finished_point_gets_its_value_and_the_sampler_is_asked_again():
    study = _study()
    study.enqueue_trial(PAPER)
    study.enqueue_trial(PAPER)  # the sampler proposes the paper's defaults a second time
    first = ask_distinct(study, GRID)
    study.tell(first, 0.25)
    second = ask_distinct(study, GRID)
    assert second.params != PAPER
    repeat = [t for t in study.trials if DUPLICATE_ATTR in t.user_attrs]
    assert len(repeat) == 1 and repeat[0].params == PAPER
    assert repeat[0].state == TrialState.COMPLETE and repeat[0].value == 0.25
    assert repeat[0].user_attrs[DUPLICATE_ATTR] == first.number


def test_a_repeat_of_a_running_point_is_failed_and_a_full_grid_keeps_the_repeat():
    study = _study()
    study.enqueue_trial(PAPER)
    study.enqueue_trial(PAPER)
    running = ask_distinct(study, GRID)  # not told yet: still running
    other = ask_distinct(study, GRID)
    assert other.params != running.params
    (repeat,) = [t for t in study.trials if DUPLICATE_ATTR in t.user_attrs]
    assert repeat.state == TrialState.FAIL and repeat.params == PAPER

    small = {"k": CategoricalDistribution([1.0, 2.0])}
    full = _study(seed=1)
    for value in (1.0, 2.0):
        full.enqueue_trial({"k": value})
        full.tell(ask_distinct(full, small), value)
    again = ask_distinct(full, small)  # every point trained: a repeat is all there is
    assert again.params["k"] in (1.0, 2.0)


def test_ray_optuna_search_suggests_a_new_point_instead_of_a_trained_one():
    from ray import tune

    space = {"k": tune.choice([0.5, 1.0, 2.0]), "c": tune.choice([1.0, 2.0])}
    searcher = PruningOptunaSearch(
        space=space,
        metric="bbox_mAP",
        mode="max",
        points_to_evaluate=[PAPER, PAPER],
        sampler=optuna.samplers.RandomSampler(seed=0),
        max_t=2,
    )
    assert searcher.suggest("a") == PAPER
    searcher.on_trial_complete("a", {"bbox_mAP": 0.3, "epoch": 2})
    config = searcher.suggest("b")
    assert config is not None and config != PAPER
    searcher.on_trial_complete("b", {"bbox_mAP": 0.1, "epoch": 2})
    trials = {t.number: t for t in searcher._ot_study.trials}  # noqa: SLF001 (the searcher's record)
    assert [t.state for t in trials.values()] == [TrialState.COMPLETE] * 3
    assert trials[1].params == PAPER and trials[1].value == 0.3 and trials[1].user_attrs[DUPLICATE_ATTR] == 0
    assert trials[2].params == config and trials[2].value == 0.1  # "b" was told to the trial it trained


def test_a_pilots_point_copied_in_by_a_warm_start_is_trained_again():
    from pisa.search.distinct import WARM_ATTR

    study = _study()
    study.add_trial(
        optuna.trial.create_trial(params=PAPER, distributions=GRID, value=0.2, user_attrs={WARM_ATTR: "pilot"})
    )
    study.enqueue_trial(PAPER)  # the pilot's best, evaluated first at this study's fidelity
    assert ask_distinct(study, GRID).params == PAPER
