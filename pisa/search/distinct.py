"""No point trained twice in a discrete search space.

A study over `choice` values (the quickstart's 5 x 5 grid) is small enough that its sampler
proposes a point it has already trained: TPE proposed the paper's defaults, the study's first
trial, again as the last of 4 (a quarter of the search on a known value). Optuna's own advice
("how to avoid evaluating the same parameters") is to answer such a trial without training it;
here it is told to Optuna before the sampler is asked again: as COMPLETE with the value already
recorded when that trial has finished, else as FAIL (a trial still running has no value yet,
and a FAIL trial is one the samplers leave out). Continuous spaces are left alone: a repeat
there is a coincidence of measure zero.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

DUPLICATE_ATTR = "pisa:duplicate_of"  # the Optuna trial number a duplicate repeated
# a trial a warm start copied in from a pilot (`warm_start.WARM_ATTR`): trained at another
# fidelity, so its point is still worth training here (the pilot's best is, first)
WARM_ATTR = "warm_start_from"


def grid_size(distributions: dict[str, optuna.distributions.BaseDistribution]) -> int | None:
    """How many distinct points a space of categorical distributions has; None otherwise."""
    from optuna.distributions import CategoricalDistribution

    size = 1
    for dist in distributions.values():
        if not isinstance(dist, CategoricalDistribution):
            return None
        size *= len(dist.choices)
    return size


def earlier_same_point(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """Another trial of `study` at `trial`'s point that is finished with a value or still
    running (a FAIL or PRUNED one does not count: its point may be tried again, nor does a
    pilot's, copied in by a warm start)."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if other.number != trial.number and other.params == trial.params and WARM_ATTR not in other.user_attrs:
            return other
    return None


def settle_duplicate(study: optuna.Study, trial: optuna.Trial, same: optuna.trial.FrozenTrial) -> None:
    """Tell Optuna a duplicate without training it: the value it has, else FAIL."""
    from optuna.trial import TrialState

    trial.set_user_attr(DUPLICATE_ATTR, same.number)
    if same.state == TrialState.COMPLETE and same.values is not None:
        study.tell(trial, same.values)
    else:
        study.tell(trial, state=TrialState.FAIL)


def until_distinct(study: optuna.Study, trial: optuna.Trial, ask_again, size: int) -> optuna.Trial:
    """`trial`, or while it repeats a trained or running point, each repeat told to Optuna and
    `ask_again()`'s trial instead, until every point of the grid of `size` has been proposed
    (then a repeat is kept)."""
    for _ in range(size):
        same = earlier_same_point(study, trial)
        if same is None:
            return trial
        settle_duplicate(study, trial, same)
        log.info("the sampler proposed Optuna trial %s's point again; asking for another", same.number)
        trial = ask_again()
    return trial


def ask_distinct(study: optuna.Study, distributions: dict) -> optuna.Trial:
    """`study.ask(distributions)`, asked again while it repeats a point of a discrete space."""
    size = grid_size(distributions)
    trial = study.ask(distributions)
    return trial if size is None else until_distinct(study, trial, lambda: study.ask(distributions), size)
