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

from pydantic import BaseModel

from .. import tracking
from ..comparisons.table import Validation, Variant, VariantResult, compare, log_validation
from ..comparisons.training_grid import INTERRUPTED, GridTraining, slug, train_grid
from ..core import storage
from ..core.errors import ConfigError
from ..core.progress import say
from ..core.stats import verdict
from ..core.storage import join
from ..tracking import tags as tag
from ..tracking.tags import Kind, RunStatus, Status
from ..training.driver import DriverSession
from ..trials.capacity import cluster_totals, resolve, trial_resources
from .paths import study_dir
from .results import fidelity_of, outcome_from_state
from .schema import BASELINE, PAPER_DEFAULTS
from .state import StudyState, load_state, study_from_state


def variants_to_validate(study, outcome, top: int, against_paper: bool = False) -> list[Variant]:
    """Baseline, paper defaults, then the top `top` trials; a trial whose training config
    equals the baseline's or the paper's is trained once, under both labels. `against_paper`
    (the study's own stage): the paper's defaults and the top trials only, compared with the
    paper's defaults, the study's question (the baseline would cost a third more and answer
    another one)."""
    ranked = [t for t in outcome.trials if t.status != Status.FAILED and t.metric is not None]
    if top > len(ranked):
        raise ConfigError(f"--top {top}: study {outcome.name!r} has only {len(ranked)} ranked trial(s)")
    variants = [Variant("paper defaults", dict(PAPER_DEFAULTS))]
    if not against_paper:
        variants.insert(0, Variant("baseline", dict(BASELINE)))
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


class ValidationState(BaseModel):
    """A validation that a kill can cut short: its run, seeds and variants, and its verdict
    once it ends (`validation.json` in its directory), so the same command continues it."""

    run_id: str
    seeds: list[int]
    labels: list[str]
    finished: bool = False
    answer: str = ""


def validate_study(
    name: str,
    *,
    top: int,
    seeds: int,
    storage_path: str | Path = "ray_results",
    first_seed: int | None = None,
    address: str | None = None,
    verbose: bool = False,
    stage: bool = False,
) -> Validation | None:
    """Train every variant on every seed (seed by seed), log and return the comparison.
    `verbose` shows the trainings' own output (otherwise in each trial's directory).
    `stage`: the study's own last stage (`validate:` in the study file) — its top points are
    compared with the paper's defaults, and a kill is continued by resuming the study
    (finished trainings stay); None when that stage had finished before."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1 (2 or more for an interval)")
    if top < 0:
        raise ConfigError(f"--top {top}: must be 0 or more")
    state = load_state(name, storage_path)
    study = study_from_state(state)
    outcome = outcome_from_state(name, storage_path)
    variants = variants_to_validate(study, outcome, top, against_paper=stage)
    seed_list = validation_seeds(study, seeds, first_seed)
    uri = state.tracking_uri
    driver = DriverSession(
        uri, address=address, storage_path=study.base_config.storage_path, source="study", verbose=verbose
    )
    grid = STAGE_DIR if stage else f"validation-{time.strftime('%Y%m%d-%H%M%S')}"
    root = join(study_dir(study), grid)
    kept = _kept_state(root) if stage else None
    if kept is not None and kept.finished:
        say(f"validation of {study.name} finished before (MLflow run {kept.run_id}): {kept.answer}")
        return None
    if kept is None:
        fidelity = fidelity_of(outcome, study)  # how far the study's own ranking can be trusted
        run_id = _start_run(state, top, seed_list, variants)
        if not stage:  # the study's own end says it
            say(fidelity.text())
            if warning := fidelity.warning():
                say(warning)
        tracking.tracker(uri).log_metrics(run_id, fidelity.metrics(), 0)
        kept = ValidationState(run_id=run_id, seeds=seed_list, labels=[v.label for v in variants])
        if stage:
            storage.write_text(join(root, STATE_FILE), kept.model_dump_json(indent=2))
    else:
        tracking.tracker(uri).update_status(kept.run_id, RunStatus.RUNNING)
        say(f"continuing the validation of {study.name} (MLflow run {kept.run_id}): finished trainings stay")
    validation = _train_and_compare(study, state, variants, kept, root, driver)
    if stage:
        kept.finished, kept.answer = True, answer(validation)
        storage.write_text(join(root, STATE_FILE), kept.model_dump_json(indent=2))
    return validation


STAGE_DIR = "validation"  # the study's own validation stage, under its directory
STATE_FILE = "validation.json"


def validation_answer(study) -> str:
    """The study's answer from its finished validation stage, "" when it has none yet."""
    kept = _kept_state(join(study_dir(study), STAGE_DIR))
    return kept.answer if kept is not None and kept.finished else ""


def _kept_state(root: str) -> ValidationState | None:
    path = join(root, STATE_FILE)
    if not storage.exists(path):
        return None
    return ValidationState.model_validate_json(storage.read_text(path))


def _train_and_compare(
    study, state: StudyState, variants: list[Variant], kept: ValidationState, root: str, driver: DriverSession
) -> Validation:
    """The variants x seeds as one training grid (continued when its Tune run exists), the
    comparison logged on the validation's run and that run ended."""
    uri, metric, mode = state.tracking_uri, state.metric, state.mode
    results = [VariantResult(v) for v in variants]
    # seed-major: a validation cut short leaves complete pairs
    jobs = [(seed, r) for seed in kept.seeds for r in results]
    trainings_dir = join(root, "trainings")  # where multi-worker trainings checkpoint
    trainings = [_training(study, r.variant, seed, uri, state.name, trainings_dir) for seed, r in jobs]
    in_trial = study.trains_in_trial(seeds=1)
    num_classes = driver.start(study.base_config, dashboard=not in_trial)
    parallel = trainings_at_once(study, len(jobs))
    say(f"{len(jobs)} trainings, {parallel} at a time")
    outcomes = train_grid(
        trainings,
        uri=uri,
        parent_run_id=kept.run_id,
        storage_path=root,
        name="grid",
        in_trial=in_trial,
        resources=trial_resources(study.base_config.train, in_trial),
        concurrent=parallel,
        max_failures=study.cfg.max_failures,
        score=(metric, mode),
        num_classes=num_classes,
        resume=storage.exists(join(root, "grid", "tuner.pkl")),
    )
    if any(out.error == INTERRUPTED for out in outcomes):
        driver.interrupted(kept.run_id)
        raise KeyboardInterrupt
    for (seed, r), out in zip(jobs, outcomes):
        r.add(seed, out, metric)
    compare(results, mode)
    validation = Validation(state.name, metric, mode, kept.seeds, results, kept.run_id, uri)
    log_validation(validation)
    tracking.tracker(uri).end_run(kept.run_id, RunStatus.FINISHED if validation.ok else RunStatus.FAILED)
    return validation


def answer(v: Validation) -> str:
    """The study's answer in one line: its best point against the paper's defaults, with the
    paired difference's 95% interval and what it says at this budget."""
    by_label = {r.variant.label.split(" = ")[0]: r for r in v.results}
    paper = by_label.get("paper defaults")
    best = next((r for r in v.results if r.variant.label.startswith("#1 ")), None)
    if paper is not None and "#1 " in paper.variant.label:
        return f"the study's best point is the paper's defaults ({_mean(paper)} over seeds {v.seeds})"
    if best is None or paper is None or best.vs_baseline is None:
        return "no ranked point to compare with the paper's defaults"
    d = best.vs_baseline.difference
    if d.mean is None or d.ci_low is None or d.ci_high is None:
        return f"{best.variant.label} against the paper's defaults: too few seeds for an interval"
    said = verdict(best.vs_baseline, v.mode)
    if said == "no significant difference":
        said += " at this budget"
    scale = 100.0  # AP points, as the paper reports them
    return (
        f"{best.variant.label} ({_params(best.variant.params)}) against the paper's defaults: "
        f"{d.mean * scale:+.1f} AP, 95% CI [{d.ci_low * scale:+.1f}, {d.ci_high * scale:+.1f}] over "
        f"{len(best.vs_baseline.seeds)} seeds, {best.vs_baseline.wins}/{len(best.vs_baseline.seeds)} wins: {said}"
    )


def _mean(r: VariantResult) -> str:
    return f"{r.summary.mean:.4f}" if r.summary is not None else "no value"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


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
    limit = min(jobs, study.cfg.max_concurrent_trials * study.seeds_at_once())
    return resolve(study.base_config.train, cluster_totals(), limit=limit).at_once
