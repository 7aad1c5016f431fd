"""`pisa study`: a Ray Tune search over PISA's parameters, every trial tracked in MLflow.

A 1-worker trial trains in its Tune trial's own process (`TuneTrialSession`): no Ray
Train controller or worker group to start, and Tune reuses the trial actors, so the
next trial starts with torch already imported. A multi-worker trial is one Ray Train
run (a `TorchTrainer` fitted inside a Tune function trainable that holds no CPU
itself); `trial_process: ray_train` forces that path for every trial. Optuna's TPE proposes the points (the paper's
defaults first), ASHA stops weak trials by epoch, and a Tune callback on the driver
logs everything to MLflow: one parent run per study, one nested child run per trial,
so a SQLite store is only ever written by this one process.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .. import tracking
from ..core import storage
from ..core.config import flatten
from ..core.errors import ConfigError, StudyError, one_line
from ..core.progress import say
from ..core.uris import public_uri, redact
from ..planning.cost_plan import Plan as CostPlan
from ..planning.cost_plan import plan_at_start
from ..tracking import tags as tag
from ..tracking.tags import Kind, RunStatus, Status
from ..training.cluster import check_training_fits
from ..training.driver import DriverSession
from ..trials.capacity import Capacity, cluster_totals, trial_resources
from ..trials.recovery import FAILED_MARK
from .budget import BudgetLimiter, BudgetSpec, BudgetStopper
from .budget import finish as finish_budget
from .console import StudyConsole
from .mlflow_logger import MlflowStudyLogger
from .paths import state_path, study_dir, trial_storage
from .plan_actual import compare as plan_vs_actual
from .plan_actual import compare_validation, logged_plan
from .report import log_study_report
from .results import StudyOutcome, check_parent_run, collect, summarize_parent
from .samplers import build_sampler
from .schema import SearcherConfig
from .state import StudyState, check_resumable, load_state, optuna_url, save_state, study_from_state, tune_dir
from .study import Study
from .trainable import run_trial, tune_space
from .warm_start import read_pilot
from .warm_start import seed as seed_warm_start

STATUS_EVERY_S = 120.0  # Tune's trial table on the console, at most this often


def _trainable(study: Study):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, study=study), trial_resources(study.base_config.train, study.trains_in_trial())
    )


def _check_trial_fits(study: Study, address: str | None) -> None:
    """One trial's training must fit the cluster, or the study would wait forever."""
    waiting = check_training_fits(
        study.base_config.train,  # its train.* are the study's resources_per_trial (see loading)
        address,
        f"{study.source}: resources_per_trial",
        hint="on CPUs: gpus_per_worker: 0; fewer workers: workers: N",
    )
    if waiting:
        say(waiting)


def _capacity(study: Study) -> Capacity:
    """The trials at once on the started cluster, said when fewer than the study's limit."""
    capacity = study.capacity(cluster_totals())
    if capacity.note:
        say(capacity.note)
    return capacity


def _budget_spec(study: Study, uri: str, parent_run_id: str, plan: CostPlan | None = None) -> BudgetSpec | None:
    """The study's budget (None without one), priced at the plan's rate when it has one
    (`plan`: the one this start logged; a resumed study's is the one it started with, else made here)."""
    if study.cfg.budget is None:
        return None
    if plan is None:  # a resumed study: priced as it started (the searcher Tune restores was)
        logged = logged_plan(uri, parent_run_id)
        if logged is not None:
            return BudgetSpec.of(study, uri, parent_run_id, logged.get("epoch_s"))
        try:
            plan = plan_at_start(study.workload(), uri)
        except Exception:  # priced at the study's own epochs instead
            plan = None
    return BudgetSpec.of(study, uri, parent_run_id, plan.epoch_s if plan is not None else None)


def start_plan(study: Study, uri: str) -> CostPlan | None:
    """What the study will cost, from an earlier run's rate (no probe: it would delay the
    trials); None, said in one line, when it cannot be made."""
    try:
        return plan_at_start(study.workload(), uri)
    except Exception as exc:  # a forecast never stops a study
        say(f"plan skipped: {one_line(exc)}")
        return None


def check_budget_room(study: Study, plan: CostPlan | None) -> None:
    """A budget that cannot pay the validation stage and one search trial at the plan's rate:
    one line naming the study file's field, before anything starts. Without a rate the budget
    keeps the stage's share once the first epochs have measured one (`budget.Ledger.reserved`)."""
    budget = study.cfg.budget
    if budget is None or plan is None or plan.fifo.hours is None:
        return
    trial = plan.fifo.hours / max(plan.num_samples, 1)
    stage = (plan.validation.hours or 0.0) if plan.validation is not None else 0.0
    if stage + trial <= budget.hours:
        return
    field = "validation.seeds" if stage > 0 else "budget.hours"
    what = f"the validation stage (~{stage:.3g}) and one search trial (~{trial:.3g})" if stage else "one trial"
    raise ConfigError(
        f"{study.source}: {field}: {what} need ~{stage + trial:.3g} {plan.kind}-hours at the plan's rate "
        f"({plan.rate.source if plan.rate else 'unknown'}), more than budget.hours {budget.hours:g}: "
        "raise budget.hours or lower validation.seeds / validation.top"
    )


def log_plan(study: Study, uri: str, parent: str, plan: CostPlan | None = None) -> CostPlan | None:
    """The study's plan (`plan`, else made here) said in one line and logged to its run."""
    plan = plan if plan is not None else start_plan(study, uri)
    if plan is None:
        return None
    say(plan.line())
    tracking.tracker(uri).log_text(parent, plan.text(), "plan.txt")
    tracking.tracker(uri).log_text(parent, json.dumps(plan.to_dict(), indent=2, default=str), "plan.json")
    return plan


def _tuner(
    study: Study,
    capacity: Capacity,
    uri: str,
    parent_run_id: str,
    verbose: bool = False,
    budget: BudgetSpec | None = None,
    *,
    points: list[dict] | None = None,
    samples: int | None = None,
    run_dir: str | None = None,
    searcher_cfg: SearcherConfig | None = None,
    done_before: int = 0,
):
    """The study's `Tuner`, read top to bottom as Ray's Tune examples are: searcher,
    scheduler, trainable, then the run's settings (over 60 lines: each setting once, with
    why). `points` (the study's initial points), `samples` (its num_samples), `run_dir`
    (a Tune run in the study's directory, `pisa study extend`) and `searcher_cfg` replace
    the study's own; `done_before`: trials an earlier run finished (the console counts on)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher

    from .optuna_storage import PruningOptunaSearch, open_storage  # Optuna

    cfg = study.cfg
    epochs = study.base_config.train.resolved().epochs
    points = study.initial_points() if points is None else points
    sampler_cfg = cfg.searcher if searcher_cfg is None else searcher_cfg
    searcher: Searcher = PruningOptunaSearch(
        points_to_evaluate=points or None,
        sampler=build_sampler(sampler_cfg, num_samples=cfg.num_samples, parallel=capacity.at_once, seed=cfg.seed),
        study_name=study.name,
        storage=open_storage(optuna_url(study, uri)),
        time_attr="epoch",
        max_t=epochs,
        max_seeds=cfg.racing.max_seeds if cfg.racing is not None else None,
    )
    if budget is not None:  # no trial the budget cannot pay to max_t (`budget`)
        searcher = BudgetLimiter(searcher, capacity.at_once, budget)
    else:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=capacity.at_once)
    if cfg.scheduler.type == "asha":
        scheduler: TrialScheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=min(cfg.scheduler.grace_period, epochs),
            reduction_factor=cfg.scheduler.reduction_factor,
        )
    elif cfg.racing is not None:
        from .race_scheduler import RacingScheduler
        from .racing import RacingRule

        rule = RacingRule(cfg.racing.min_seeds, cfg.racing.max_seeds, cfg.racing.confidence)
        scheduler = RacingScheduler(rule, study.objective, epochs)
    else:
        scheduler = FIFOScheduler()
    trainable = _trainable(study)
    return tune.Tuner(
        trainable,
        param_space=tune_space(study),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=samples or cfg.num_samples,
            # a reused trial actor has torch and the data loaded already
            reuse_actors=study.trains_in_trial(),
        ),
        run_config=tune.RunConfig(
            name=run_dir or study.name,
            storage_path=study_dir(study) if run_dir else study.base_config.storage_path,
            # the logger is saved with the experiment: no credentials in it (they're in the env)
            callbacks=[
                MlflowStudyLogger(study, public_uri(uri), parent_run_id),
                StudyConsole(study, status_every_s=math.inf if verbose else STATUS_EVERY_S, done_before=done_before),
            ],
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # a spent budget stops the running trials at their epoch's end
            stop=BudgetStopper(budget) if budget is not None else None,
            # the best `keep_checkpoints` by the study's metric (and the latest, which Tune never
            # deletes): the best epoch's checkpoint is what MLflow and `--register` get
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=study.base_config.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.metric,
                checkpoint_score_order=cfg.mode,
            ),
            # each trial's stdout/stderr in its directory under the Ray results directory
            log_to_file=True,
            verbose=1 if verbose else 0,
        ),
    )


def run_study(
    study: Study, *, address: str | None = None, verbose: bool = False, warm_start: str | None = None
) -> StudyOutcome:
    """Run a study from the start; the tracking store is checked before any trial. `warm_start`:
    another study whose finished trials seed the searcher (`warm_start`)."""
    started = time.time()
    uri = study.base_config.tracking.resolved_uri()
    driver = DriverSession(
        uri, address=address, storage_path=study.base_config.storage_path, source=str(study.source), verbose=verbose
    )
    if storage.exists(state_path(study)) and storage.exists(storage.join(study_dir(study), "tuner.pkl")):
        raise StudyError(
            f"study {study.name!r} already exists in {storage.display(study_dir(study))}: continue it with "
            f"`pisa study resume {study.name}` or choose another name (--set name=...)"
        )
    warm = read_pilot(study, warm_start) if warm_start else None  # a bad one: nothing started
    driver.start(study.base_config, dashboard=not study.trains_in_trial())
    _check_trial_fits(study, address)
    capacity = _capacity(study)  # a point that cannot fit the cluster fails before any run exists
    plan = start_plan(study, uri)
    check_budget_room(study, plan)  # nor one the budget cannot pay
    experiment = study.base_config.tracking.experiment
    parent = tracking.tracker(uri).start_run(
        experiment,
        f"study {study.name}",
        params={
            "study." + k: v
            for k, v in flatten(study.cfg.model_dump(mode="json", exclude={"experiment", "search_space"})).items()
        },
        tags={tag.KIND: Kind.STUDY, tag.STUDY: study.name},
    )
    tracking.tracker(uri).log_text(parent, study.source.read_text(), "study.yaml")
    tracking.tracker(uri).log_text(
        parent, json.dumps(study.cfg.model_dump(mode="json")["search_space"], indent=2), "search_space.json"
    )
    tracking.tracker(uri).log_text(parent, study.base_config.to_yaml(), "base_config.yaml")
    save_state(study, parent, uri, warm_start_from=warm.source if warm else None)
    _print_start(study, uri, parent, plan)
    for note in driver.notes:
        say(f"note: {note}")
    budget = _budget_spec(study, uri, parent, plan)
    if warm is not None:
        seed_warm_start(study, optuna_url(study, uri), warm, uri, parent)
        say(warm.line(study.name))
        points = [warm.best] if warm.best else []
        searcher_cfg = warm.searcher(study.cfg.searcher, study.cfg.num_samples)
        tuner = _tuner(study, capacity, uri, parent, verbose, budget, points=points, searcher_cfg=searcher_cfg)
    else:
        tuner = _tuner(study, capacity, uri, parent, verbose, budget)
    return _fit_and_finish(study, tuner, uri, parent, budget, started)


def resume_study(
    name: str,
    *,
    storage_path: str | Path = "ray_results",
    address: str | None = None,
    retry_failed: bool = False,
    verbose: bool = False,
) -> StudyOutcome:
    """Continue an interrupted study as it was started (its `--set` overrides included):
    finished trials stay, unfinished ones restart from their last checkpoint, failed ones
    stay failed unless `retry_failed` (then they continue from their last checkpoint)."""
    from ray import tune

    started = time.time()
    state, study = reopen_study(name, storage_path, address, verbose)
    uri = state.tracking_uri
    if retry_failed:  # their errors may have been fixed (data, a node); let them run again
        _clear_failed_marks(study)
    tracking.tracker(uri).update_status(state.parent_run_id, RunStatus.RUNNING)
    trainable = _trainable(study)
    tuner = tune.Tuner.restore(
        tune_dir(state), trainable=trainable, resume_unfinished=True, resume_errored=retry_failed, restart_errored=False
    )
    say(
        f"resuming study {study.name} from {storage.display(state.dir)}"
        + (" (retrying failed trials)" if retry_failed else "")
    )
    return _fit_and_finish(
        study, tuner, uri, state.parent_run_id, _budget_spec(study, uri, state.parent_run_id), started
    )


def reopen_study(name: str, storage_path: str | Path, address: str | None, verbose: bool) -> tuple[StudyState, Study]:
    """A study that ran before, made ready to go on (`resume`, `extend`): its state read and
    checked (the release that wrote it, its MLflow run), Ray started, a trial's fit checked."""
    state = load_state(name, storage_path)
    check_resumable(state)
    study = study_from_state(state)
    uri = state.tracking_uri
    driver = DriverSession(
        uri,
        address=address,
        storage_path=study.base_config.storage_path,
        source=storage.display(state.dir),
        verbose=verbose,
    )
    driver.start_with(lambda: tracking.tracker(uri), dashboard=not study.trains_in_trial())
    check_parent_run(state)  # a deleted MLflow run: one line, before a trial restarts
    _check_trial_fits(study, address)
    return state, study


def _clear_failed_marks(study: Study) -> None:
    root = trial_storage(study)
    if not storage.exists(root):
        return
    for trial_dir in storage.list_dirs(root):
        storage.delete(storage.join(root, trial_dir, FAILED_MARK))


def _print_start(study: Study, uri: str, parent: str, plan: CostPlan | None = None) -> None:
    """The study's first lines, its plan among them (`plan`, else made here)."""
    cfg = study.cfg
    say(
        f"study {study.name}: {cfg.num_samples} trials, {cfg.max_concurrent_trials} at a time, "
        f"{cfg.scheduler.type} scheduler, metric {cfg.metric} ({cfg.mode})"
        f"{f' = mean over seeds {study.seeds()}' if cfg.seeds > 1 else ''}"
        f"{_racing_words(study)}; "
        f"searching {', '.join(cfg.search_space)}"
    )
    if study.packing is not None:
        say(study.packing.line())
    log_plan(study, uri, parent, plan)
    say(f"MLflow: {redact(uri)}")
    say(f"storage: {storage.display(study_dir(study))}")
    url = optuna_url(study, uri)
    if url:
        shown = redact(url)
        say(f"Optuna: {shown}  (see it with `optuna-dashboard {shown}`)")


def _racing_words(study: Study) -> str:
    racing = study.cfg.racing
    if racing is None:
        return ""
    return (
        f" = mean over seeds {study.seeds()[0]}.. raced: {racing.min_seeds} at first, one more while "
        f"not behind the best finished point (one-sided {racing.confidence:.0%}), up to {racing.max_seeds}"
    )


def _fit_and_finish(
    study: Study, tuner, uri: str, parent: str, budget: BudgetSpec | None = None, started: float | None = None
) -> StudyOutcome:
    started = time.time() if started is None else started
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    outcome = collect(study.name, uri, study.base_config.tracking.experiment, parent, study.cfg.metric, study.cfg.mode)
    outcome.search_space = dict(study.cfg.search_space)
    expected = study.cfg.num_samples
    done = [t for t in outcome.trials if t.status in tag.DONE]
    on_budget = False
    if budget is not None:  # planned vs spent, from what MLflow recorded
        try:
            on_budget, outcome.budget = finish_budget(budget, len(done), expected)
            say(outcome.budget)
        except Exception as exc:  # the report must never cost the study's results
            say(f"budget report skipped: {one_line(exc)}")
    interrupted = interrupted or (len(done) < expected and not on_budget)
    outcome.interrupted = interrupted
    try:
        log_study_report(outcome, study)
    except Exception as exc:  # a plot must never cost the study's results
        say(f"report skipped: {exc}")
    summarize_parent(uri, parent, outcome)
    try:  # the plan it started with against what it did
        say(plan_vs_actual(uri, parent, outcome, time.time() - started))
    except Exception as exc:
        say(f"plan vs actual skipped: {one_line(exc)}")
    tags: dict[str, str]
    if interrupted:
        tags, status = {tag.STATUS: Status.INTERRUPTED}, RunStatus.KILLED
    elif outcome.all_failed:
        error, count = outcome.most_common_error()
        tags = {
            tag.STATUS: Status.FAILED,
            tag.ERROR: f"all {len(outcome.trials)} trials failed; {count} with: {error}",
        }
        status = RunStatus.FAILED
    else:
        tags, status = {tag.STATUS: Status.FINISHED}, RunStatus.FINISHED
    tracking.tracker(uri).set_tags(parent, tags)
    tracking.tracker(uri).end_run(parent, status)
    if not interrupted and not outcome.all_failed and study.cfg.validation is not None:
        _validation_stage(study, outcome)
    return outcome


def _validation_stage(study: Study, outcome: StudyOutcome) -> None:
    """The study's answer: its top points and the paper's defaults over fresh seeds
    (`validate.validate_study`); a kill here is continued by `pisa study resume`."""
    from .validate import validate_study, validation_answer

    stage = study.cfg.validation
    assert stage is not None
    say(f"validating the answer: the top {stage.top} point(s) and the paper's defaults over {stage.seeds} fresh seeds")
    started = time.time()
    try:
        outcome.validation = validate_study(
            study.name, top=stage.top, seeds=stage.seeds, storage_path=study.base_config.storage_path, stage=True
        )
    except KeyboardInterrupt:
        outcome.interrupted = True
        say(f"validation interrupted: continue it with `pisa study resume {study.name}` (finished trainings stay)")
        return
    if (done := outcome.validation) is not None:
        try:  # the stage's bill against the plan's
            trainings, wall = len(done.seeds) * len(done.results), time.time() - started
            say(compare_validation(outcome.tracking_uri, outcome.parent_run_id, done.run_id, trainings, wall))
        except Exception as exc:  # a report never fails a study
            say(f"validation plan vs actual skipped: {one_line(exc)}")
    outcome.answer = validation_answer(study)
