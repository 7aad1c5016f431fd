"""`pisa study validate`: re-check a study's top points against the baseline and the paper's
defaults over the same N seeds, and say how sure the comparison is.

A study ranks points by one value each (or a mean over a few seeds), and the best of many
noisy values is optimistic: the winner is partly the luckiest. Validation trains every
variant again, with seeds the study did not use (by default), all variants on the same
seeds, as many trainings side by side as the study ran (each with its trial resources), and compares the
final-epoch metric: mean, standard deviation, t-interval per variant, and the paired
difference to the baseline per seed (`pisa.core.stats`). Everything is logged to one MLflow run
linked to the study (tag `pisa.study_run_id`; the study's run gets `pisa.validation_run_id`),
with the trainings nested under it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .. import tracking
from ..comparisons.table import Validation, Variant, VariantResult, compare, log_validation
from ..comparisons.training_grid import GridTraining, slug, train_grid
from ..core.errors import ConfigError
from ..core.progress import say
from ..core.storage import join
from ..tracking import tags as tag
from ..tracking.tags import Kind, RunStatus, Status
from ..training.cluster import check_cluster_setup
from ..training.ray_runtime import quiet_libraries
from ..trials.capacity import cluster_totals, resolve, trial_resources
from .paths import study_dir
from .results import fidelity_of, outcome_from_state
from .schema import BASELINE, PAPER_DEFAULTS
from .state import StudyState, load_state, study_from_state


def plan(study, outcome, top: int) -> list[Variant]:
    """Baseline, paper defaults, then the top `top` trials; a trial whose training config
    equals the baseline's or the paper's is trained once, under both labels."""
    ranked = [t for t in outcome.trials if t.status != Status.FAILED and t.metric is not None]
    if top > len(ranked):
        raise ConfigError(f"--top {top}: study {outcome.name!r} has only {len(ranked)} ranked trial(s)")
    variants = [Variant("baseline", dict(BASELINE)), Variant("paper defaults", dict(PAPER_DEFAULTS))]
    configs = [_config_key(study, v.params) for v in variants]
    space = study.cfg.search_space
    for rank, trial in enumerate(ranked[:top], 1):
        params = {
            k: space[k].parse_logged(v) if k in space and isinstance(v, str) else v for k, v in trial.params.items()
        }
        key = _config_key(study, params)
        label = f"#{rank} {trial.trial_id}"
        if key in configs:
            same = variants[configs.index(key)]
            same.label += f" = {label}"
            same.trial_run_id = same.trial_run_id or trial.run_id
            continue
        variants.append(Variant(label, params, trial.run_id))
        configs.append(key)
    return variants


def _config_key(study, params: dict[str, Any]) -> str:
    return study.experiment(params).model.model_dump_json()


def validation_seeds(study, seeds: int, first_seed: int | None) -> list[int]:
    """`seeds` seeds, by default the ones after those the study trained with."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1 (2 or more for an interval)")
    start = first_seed if first_seed is not None else study.seeds()[-1] + 1
    return list(range(start, start + seeds))


def validate_study(
    name: str,
    *,
    top: int,
    seeds: int,
    storage_path: str | Path = "ray_results",
    first_seed: int | None = None,
    address: str | None = None,
    verbose: bool = False,
) -> Validation:
    """Train every variant on every seed (seed by seed), log and return the comparison.
    `verbose` shows the trainings' own output (otherwise in each trial's directory). Long
    because it checks every argument up front (one-line errors, nothing started) before
    the one call that trains."""
    from ..training.train import start_ray_with_data  # torch: the training's entry points

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1 (2 or more for an interval)")
    if top < 0:
        raise ConfigError(f"--top {top}: must be 0 or more")
    state = load_state(name, storage_path)
    study = study_from_state(state)
    outcome = outcome_from_state(name, storage_path)
    variants = plan(study, outcome, top)
    seed_list = validation_seeds(study, seeds, first_seed)
    uri, metric, mode = state.tracking_uri, state.metric, state.mode
    check_cluster_setup(address, uri, study.base_config.storage_path, "study")
    tracking.check_reachable(uri)
    if not verbose:
        quiet_libraries()
    fidelity = fidelity_of(outcome, study)  # how far the study's own ranking can be trusted

    run_id = _start_run(state, top, seed_list, variants)
    say(fidelity.text())
    if warning := fidelity.warning():
        say(warning)
    tracking.tracker(uri).log_metrics(run_id, fidelity.metrics(), 0)
    results = [VariantResult(v) for v in variants]
    # seed-major: a validation cut short leaves complete pairs
    jobs = [(seed, r) for seed in seed_list for r in results]
    name = f"validation-{time.strftime('%Y%m%d-%H%M%S')}"
    trainings_dir = join(study_dir(study), name, "trainings")  # where multi-worker trainings checkpoint
    trainings = [_training(study, r.variant, seed, uri, state.name, trainings_dir) for seed, r in jobs]
    in_trial = study.trains_in_trial(seeds=1)
    num_classes = start_ray_with_data(study.base_config, uri, address, verbose=verbose, dashboard=not in_trial)
    parallel = trainings_at_once(study, len(jobs))
    say(f"{len(jobs)} trainings, {parallel} at a time")
    outcomes = train_grid(
        trainings,
        uri=uri,
        parent_run_id=run_id,
        storage_path=study_dir(study),
        name=name,
        in_trial=in_trial,
        resources=trial_resources(study.base_config.train, in_trial),
        concurrent=parallel,
        max_failures=study.cfg.max_failures,
        score=(metric, mode),
        num_classes=num_classes,
    )
    for (seed, r), out in zip(jobs, outcomes):
        r.add(seed, out, metric)
    compare(results, mode)
    validation = Validation(state.name, metric, mode, seed_list, results, run_id, uri)
    log_validation(validation)
    tracking.tracker(uri).end_run(run_id, RunStatus.FINISHED if validation.ok else RunStatus.FAILED)
    return validation


def _start_run(state: StudyState, top: int, seed_list: list[int], variants: list[Variant]) -> str:
    """The validation's own MLflow run, linked with the study's run both ways; announced."""
    run_id = tracking.tracker(state.tracking_uri).start_run(
        state.experiment,
        f"validate {state.name}",
        params={
            "top": top,
            "seeds": json.dumps(seed_list),
            "metric": state.metric,
            "variants": json.dumps([v.label for v in variants]),
        },
        tags={tag.KIND: Kind.VALIDATION, tag.STUDY: state.name, tag.STUDY_RUN_ID: state.parent_run_id},
    )
    tracking.tracker(state.tracking_uri).set_tags(state.parent_run_id, {tag.VALIDATION_RUN_ID: run_id})
    say(
        f"validating study {state.name}: {len(variants)} variants x seeds {seed_list}, "
        f"final-epoch {state.metric}; MLflow run {run_id}"
    )
    return run_id


def _training(study, variant: Variant, seed: int, uri: str, study_name: str, storage_path: str) -> GridTraining:
    """The study's base config with the variant's params and the seed, tracked in `uri`."""
    exp = study.experiment(variant.params)
    exp = exp.model_copy(
        update={
            "train": exp.train.model_copy(update={"seed": seed}),
            "tracking": exp.tracking.model_copy(update={"uri": uri}),
            "storage_path": storage_path,
        }
    )
    tags = {
        tag.KIND: Kind.VALIDATION_TRAINING,
        tag.STUDY: study_name,
        tag.VARIANT: variant.label,
        tag.SEED: str(seed),
    }
    return GridTraining(exp, f"{slug(variant.label)} seed {seed}", tags)


def trainings_at_once(study, jobs: int) -> int:
    """As many trainings side by side as the study ran at its busiest (points x seeds) and the
    Ray cluster has CPUs (GPUs) for (`trials.capacity`)."""
    limit = min(jobs, study.cfg.max_concurrent_trials * study.cfg.seeds)
    return resolve(study.base_config.train, cluster_totals(), limit=limit).at_once
