"""`pisa study run FILE --warm-start OTHER`: a study that starts from what another one learned.

How the pilot's values enter the sampler: every trial OTHER trained to its end or that its
scheduler stopped (Optuna COMPLETE or PRUNED, with its per-epoch values) is added to the new
study's Optuna record as it was, with the user attributes `warm_start_from` (OTHER) and
`warm_start_trial` (its number there). The sampler counts them as its start-up points (its
random start-up is cut to at most their number), so what it proposes comes from its model
from the first suggestion; the pilot's best point is evaluated first instead of the paper's
defaults (the pilot ran those). The pilot's values are at its own fidelity (epochs, data):
they steer the search, the new study's own trials rank it. MLflow has the study's run tagged
`pisa.warm_start_from` and the seeded trials in its artifact `warm_start.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .. import tracking
from ..core.errors import ConfigError
from .distinct import WARM_ATTR
from .optuna_storage import open_storage
from .samplers import startup_trials
from .schema import SearcherConfig
from .state import StudyState, load_state
from .study import Study

WARM_TAG = "pisa.warm_start_from"


@dataclass
class WarmStart:
    """The pilot study's finished trials, read from its Optuna record."""

    source: str
    trials: list[Any] = field(default_factory=list)  # optuna FrozenTrials, COMPLETE or PRUNED
    best: dict[str, Any] | None = None  # the best COMPLETE trial's params

    def searcher(self, cfg: SearcherConfig, num_samples: int) -> SearcherConfig:
        """The sampler's start-up cut to the seeded trials: its model proposes from the first point."""
        return cfg.model_copy(update={"startup_trials": min(startup_trials(cfg, num_samples), len(self.trials))})

    def line(self, name: str) -> str:
        states = [t.state.name.lower() for t in self.trials]
        counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
        first = "its best point first, then" if self.best else "then"
        return (
            f"warm start: {len(self.trials)} trials of study {self.source} ({counts}) added to Optuna study {name} "
            f"as they ended (user attr {WARM_ATTR}={self.source}); {first} the sampler's model"
        )


def differing_fields(study: Study, other: StudyState) -> list[str]:
    """The search-space fields (and metric, mode) in which `other` differs from `study`."""
    mine = study.cfg.model_dump(mode="json")
    theirs = (other.resolved or {}).get("study", {})
    space, their_space = mine["search_space"], theirs.get("search_space", {})
    out = [f"search_space.{k}" for k in sorted(set(space) | set(their_space)) if space.get(k) != their_space.get(k)]
    out += [k for k in ("metric", "mode") if mine[k] != theirs.get(k)]
    return out


def read_pilot(study: Study, source: str) -> WarmStart:
    """OTHER's finished trials; a one-line error (nothing started) when it cannot seed `study`."""
    import optuna
    from optuna.trial import TrialState

    flag = f"{study.source}: --warm-start {source}"
    try:
        other = load_state(source, study.base_config.storage_path)
    except Exception as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if other.name == study.name:
        raise ConfigError(f"{flag}: a study cannot start from itself")
    differ = differing_fields(study, other)
    if differ:
        raise ConfigError(f"{flag}: another search space; these fields differ: {', '.join(differ)}")
    if not other.optuna_storage:
        raise ConfigError(f"{flag}: the study has no Optuna record to start from")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        pilot = optuna.load_study(study_name=other.name, storage=open_storage(other.optuna_storage))
    except KeyError:
        raise ConfigError(f"{flag}: no Optuna study {other.name!r} in {other.optuna_storage}") from None
    trials = [
        t
        for t in pilot.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if WARM_ATTR not in t.user_attrs  # what the pilot trained itself
    ]
    if not trials:
        raise ConfigError(f"{flag}: the study has no finished trial to start from")
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = None
    if complete:
        pick = max if study.cfg.mode == "max" else min
        best = dict(pick(complete, key=lambda t: float(t.value or 0.0)).params)
    return WarmStart(other.name, trials, best)


def seed(study: Study, url: str | None, warm: WarmStart, uri: str, parent_run_id: str) -> int:
    """The pilot's trials into `study`'s Optuna record (once: a study restarted after a kill
    is not seeded twice), and the record of it on the study's MLflow run; how many were added."""
    import optuna

    ot_study = optuna.create_study(
        study_name=study.name, storage=open_storage(url), direction=study.objective.direction, load_if_exists=True
    )
    added = 0
    if not any(WARM_ATTR in t.user_attrs for t in ot_study.get_trials(deepcopy=False)):
        for t in warm.trials:
            ot_study.add_trial(
                optuna.trial.create_trial(
                    state=t.state,
                    params=t.params,
                    distributions=t.distributions,
                    values=t.values,
                    intermediate_values=t.intermediate_values,
                    user_attrs={**t.user_attrs, WARM_ATTR: warm.source, "warm_start_trial": t.number},
                )
            )
            added += 1
    rows = [{"pilot_trial": t.number, "state": t.state.name, "value": t.value, "params": t.params} for t in warm.trials]
    store = tracking.tracker(uri)
    store.set_tags(parent_run_id, {WARM_TAG: warm.source})
    store.log_text(parent_run_id, json.dumps({"from": warm.source, "trials": rows}, indent=2), "warm_start.json")
    return added
