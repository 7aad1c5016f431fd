"""What a study found, read back from MLflow: its trials ranked, the winner put on the
study's own run, and the studies under a storage path."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import tracking
from ..core import storage
from ..core.errors import PisaError, StudyError
from ..core.objective import Objective
from ..core.uris import public_uri
from ..tracking import tags as tag
from ..tracking.tags import RunStatus, Status
from .fidelity import Fidelity, measure
from .paths import SEED_VALUES_TAG, STATE_FILE, TRIAL_TAG
from .schema import Distribution
from .state import DamagedStateError, StudyState, load_state, read_state, study_from_state
from .study import Study


@dataclass
class TrialSummary:
    run_id: str
    trial_id: str
    name: str
    status: str  # finished | stopped_early | failed | running
    metric: float | None
    epochs: int
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seed_values: dict[int, float] = field(default_factory=dict)  # empty for one seed per point


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialSummary]
    metric: str = "bbox_mAP"
    interrupted: bool = False
    # the searched fields' distributions, which read their logged (text) values back;
    # empty when the study's definition is not at hand
    search_space: dict[str, Distribution] = field(default_factory=dict)
    # how well the scheduler's rungs ranked the finished trials (`fidelity_of`); None until measured
    fidelity: Fidelity | None = None
    # the validation stage's table and its one-line answer, when the study has one
    validation: Any = None
    answer: str = ""
    # `budget:`'s planned vs spent line, when the study has a budget
    budget: str = ""

    @property
    def all_failed(self) -> bool:
        return bool(self.trials) and all(t.status == Status.FAILED for t in self.trials)

    def most_common_error(self) -> tuple[str, int]:
        """The error most failed trials ended with, and how many."""
        from collections import Counter

        errors = Counter(t.error or "unknown error" for t in self.trials if t.status == Status.FAILED)
        return errors.most_common(1)[0] if errors else ("", 0)

    @property
    def best(self) -> TrialSummary | None:
        ranked = [t for t in self.trials if t.metric is not None and t.status != Status.FAILED]
        return ranked[0] if ranked else None


def summarize_parent(uri: str, parent: str, outcome: StudyOutcome) -> None:
    """Put "what won" on the study's own run: the best value as a metric, the best trial's
    params as `best.*` tags, its run id as a tag, and a note linking to it."""
    best = outcome.best
    if best is None or best.metric is None:  # `best` has a value; the check tells mypy
        return
    experiment_id = tracking.tracker(uri).experiment_of(parent)
    tracking.tracker(uri).log_metrics(parent, {f"best_{outcome.metric}": best.metric}, step=0)
    tags = {
        tag.BEST_RUN_ID: best.run_id,
        tag.BEST_TRIAL: best.trial_id,
        tag.best(outcome.metric): tag.number(best.metric),
        **{f"best.{k}": v for k, v in best.params.items()},
    }
    params = ", ".join(f"`{k}` = {v}" for k, v in best.params.items())
    tags[tag.NOTE] = (
        f"**Best trial**: [{best.name or best.trial_id}](#/experiments/{experiment_id}/runs/{best.run_id}) "
        f"with {outcome.metric} = {best.metric:.4f} ({params}).\n\n"
        f"{sum(t.status != Status.FAILED for t in outcome.trials)} of {len(outcome.trials)} trials ran; "
        f"use it with `pisa study best {outcome.name} --register`."
    )
    tracking.tracker(uri).set_tags(parent, tags)
    try:  # params are write-once: a resumed study with a new winner keeps the tags only
        tracking.tracker(uri).log_params(parent, {f"best.{k}": v for k, v in best.params.items()})
    except Exception:
        pass


@dataclass
class StudyListing:
    """One line of `pisa study list`."""

    name: str
    status: str
    trials_done: int
    trials_failed: int
    num_samples: int | None
    metric: str
    best: float | None
    tracking_uri: str
    reason: str = ""  # why a `damaged` study's state cannot be read


def list_studies(storage_path: str | Path = "ray_results") -> list[StudyListing]:
    """The studies under `storage_path` (one directory each; a local path or a URI such as
    `s3://bucket/pisa`), newest first, read from MLflow."""
    root = storage.normalize(storage_path)
    if not storage.exists(root):
        raise StudyError(f"no study storage at {storage_path}")
    states: list[StudyState] = []
    damaged: list[StudyListing] = []
    for folder in storage.list_dirs(root):
        if not storage.exists(storage.join(root, folder, STATE_FILE)):
            continue
        try:
            states.append(read_state(storage.join(root, folder)))
        except DamagedStateError as exc:  # shown, not hidden: `pisa study repair` rebuilds it
            damaged.append(StudyListing(folder, DAMAGED, 0, 0, None, "?", None, "", exc.reason))
    states.sort(key=lambda st: st.created, reverse=True)
    out = []
    for st in states:
        uri, parent = st.tracking_uri, st.parent_run_id
        try:
            run = tracking.tracker(uri).find_run(parent)
            if run is None or run.info.lifecycle_stage == "deleted":
                out.append(
                    StudyListing(st.name, "no MLflow run", 0, 0, st.num_samples, st.metric, None, uri, _gone(st, run))
                )
                continue
            status = (
                str(Status.RUNNING)
                if run.info.status == RunStatus.RUNNING
                else run.data.tags.get(tag.STATUS) or run.info.status.lower()
            )
            outcome = collect(st.name, uri, st.experiment, parent, st.metric, st.mode)
            done = [t for t in outcome.trials if t.status in tag.DONE]
            failed = sum(t.status == Status.FAILED for t in outcome.trials)
            best = outcome.best.metric if outcome.best else None
        except Exception as exc:  # an unreachable store must not hide the other studies
            status, done, failed, best = f"unknown ({type(exc).__name__})", [], 0, None
        out.append(StudyListing(st.name, status, len(done), failed, st.num_samples, st.metric, best, uri))
    return out + damaged


DAMAGED = "damaged"  # `pisa study list`'s status of a study whose state cannot be read


def _gone(state: StudyState, run) -> str:
    where = f"MLflow run {state.parent_run_id} in {public_uri(state.tracking_uri)}"
    return f"its {where} was deleted" if run is not None else f"its {where} does not exist"


def check_parent_run(state: StudyState) -> None:
    """The study's own MLflow run must be there: a deleted (or purged) one is one line saying
    so, before anything reads or writes the study's runs."""
    run = tracking.tracker(state.tracking_uri).find_run(state.parent_run_id)
    if run is not None and run.info.lifecycle_stage != "deleted":
        return
    hint = (
        f"restore it with `mlflow runs restore --run-id {state.parent_run_id}` (with MLFLOW_TRACKING_URI set to "
        "the store)"
        if run is not None
        else "the study's runs are gone"
    )
    raise StudyError(f"study {state.name!r}: {_gone(state, run)}; {hint}, or start the study again under a new name")


def collect(
    name: str, uri: str, experiment: str, parent: str, metric: str, mode: Literal["max", "min"]
) -> StudyOutcome:
    """The study's trials from MLflow, best first."""
    runs = tracking.tracker(uri).children(experiment, parent)
    trials = []
    for run in runs:
        tags = run.data.tags
        searched = [k for k in tags.get(tag.SEARCHED, "").split(",") if k]
        best = tags.get(tag.best(metric))
        value = float(best) if best is not None else run.data.metrics.get(metric)
        status = tags.get(tag.STATUS, str(Status.RUNNING))
        trials.append(
            TrialSummary(
                run_id=run.info.run_id,
                trial_id=tags.get(TRIAL_TAG, ""),
                name=run.info.run_name or "",
                status=status,
                metric=value,
                epochs=int(float(tags.get(tag.EPOCHS, run.data.metrics.get("epoch", 0) or 0))),
                params={k: run.data.params.get(k) for k in searched},
                error=tags.get(tag.ERROR),
                seed_values={int(k): float(v) for k, v in json.loads(tags.get(SEED_VALUES_TAG, "{}")).items()},
            )
        )
    objective = Objective(metric, mode)
    trials.sort(key=lambda t: (t.status == Status.FAILED, objective.rank_key(t.metric)))
    return StudyOutcome(name, parent, uri, trials, metric)


def outcome_from_state(name: str, storage_path: str | Path = "ray_results") -> StudyOutcome:
    state = load_state(name, storage_path)
    check_parent_run(state)
    outcome = collect(
        state.name,
        state.tracking_uri,
        state.experiment,
        state.parent_run_id,
        state.metric,
        state.mode,
    )
    try:
        outcome.search_space = dict(study_from_state(state).cfg.search_space)
    except (PisaError, OSError):  # an older state whose study file is gone: values shown as logged
        pass
    return outcome


def fidelity_of(outcome: StudyOutcome, study: Study) -> Fidelity:
    """The rung fidelity of the study's finished trials (`pisa.search.fidelity`), read from
    their MLflow metric histories: only they reached the last epoch."""
    run_ids = [t.run_id for t in outcome.trials if t.status == Status.FINISHED]
    epochs = study.base_config.train.resolved().epochs
    cfg = study.cfg
    return measure(outcome.tracking_uri, run_ids, cfg.metric, cfg.scheduler, epochs, cfg.seeds)


def fidelity_from_state(state: StudyState, outcome: StudyOutcome) -> Fidelity | None:
    """`fidelity_of` a study known by its state; None for an older state whose study file is gone."""
    try:
        study = study_from_state(state)
    except (PisaError, OSError):
        return None
    return fidelity_of(outcome, study)
