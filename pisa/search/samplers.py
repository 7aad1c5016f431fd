"""The Optuna sampler a study proposes points with (`searcher:` in the study file), built in
one place for the Tuner and for `benchmarks/bench_search.py`, which replays strategies
against recorded trainings with these same objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .schema import SearcherConfig

if TYPE_CHECKING:
    import optuna


def startup_trials(cfg: SearcherConfig, num_samples: int) -> int:
    """Random points before the model proposes: as given, else a quarter of the budget, at
    least 2 (TPE's own default of 10 would leave an 8-trial study a random search)."""
    if cfg.startup_trials is not None:
        return cfg.startup_trials
    return max(2, num_samples // 4)


def build_sampler(
    cfg: SearcherConfig, *, num_samples: int, parallel: int, seed: int | None
) -> optuna.samplers.BaseSampler:
    """TPE multivariate, with the constant liar when trials run side by side (a running
    trial's point is not proposed again); Optuna's GP sampler told the objective is noisy;
    scrambled Sobol points; or plain random. Options are set explicitly: Optuna 4 and 5
    differ in TPE's defaults."""
    import optuna

    startup = startup_trials(cfg, num_samples)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(
            n_startup_trials=startup, multivariate=True, constant_liar=parallel > 1, seed=seed
        )
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=startup, deterministic_objective=False, seed=seed)
    if cfg.sampler == "qmc":
        return optuna.samplers.QMCSampler(scramble=True, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)
