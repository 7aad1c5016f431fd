"""The `pisa study ...` commands: each parses nothing, calls the study package, prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..training import signals


def finish_study(outcome, storage_path: str | None = None) -> int:
    from ..core.uris import public_uri
    from ..search.report import format_ranking

    print(format_ranking(outcome, outcome.metric, limit=20))
    best = outcome.best
    if best is not None:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        print(f"best trial: {best.trial_id} ({params}): {outcome.metric} {best.metric:.4f}, MLflow run {best.run_id}")
    if outcome.fidelity is not None:
        print(outcome.fidelity.text())
        if warning := outcome.fidelity.warning():
            print(warning, file=sys.stderr)
    uri = public_uri(outcome.tracking_uri)
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    mlflow_cmd = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    ui = (
        f"{mlflow_cmd} ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000"
        if not uri.startswith("http")
        else f"open {uri}"
    )
    print(f"compare the trials in the MLflow UI:  {ui}")
    if outcome.budget:
        print(outcome.budget)
    if outcome.validation is not None:
        from ..comparisons.table import format_validation

        print(format_validation(outcome.validation))
    if outcome.answer:
        print(f"answer: {outcome.answer}")
    if outcome.interrupted:
        where = f" --storage-path {storage_path}" if storage_path and storage_path != "ray_results" else ""
        print(f"study interrupted: continue it with `pisa study resume {outcome.name}{where}`")
        return signals.interrupt_exit_code()
    if outcome.all_failed:
        error, count = outcome.most_common_error()
        print(
            f"error: all {len(outcome.trials)} trials of study {outcome.name} failed; "
            f"the most common error ({count} of {len(outcome.trials)}): {error}",
            file=sys.stderr,
        )
        return 1
    return 0


def print_registered(registered) -> None:
    print(
        f"registered {registered.model_uri} (version {registered.version}) from run {registered.run_id}; "
        f"use it with: pisa predict {registered.model_uri} IMAGE..."
    )


def study_list(args: argparse.Namespace) -> int:
    from ..search.results import DAMAGED, list_studies

    rows = list_studies(args.storage_path)
    if not rows:
        print(f"no studies under {args.storage_path}")
        return 0
    header = f"{'study':<32} {'status':<14} {'trials':>9} {'failed':>6}  {'best':>8}  metric"
    print(header)
    for r in rows:
        total = r.num_samples if r.num_samples is not None else "?"
        best = f"{r.best:.4f}" if r.best is not None else "-"
        print(
            f"{r.name:<32} {r.status:<14} {f'{r.trials_done}/{total}':>9} {r.trials_failed:>6}  {best:>8}  {r.metric}"
            + (f"  ({r.reason})" if r.reason else "")
        )
    if any(r.status == DAMAGED for r in rows):
        print(f"rebuild a damaged study's state with `pisa study repair NAME --storage-path {args.storage_path}`")
    return 0


def study_repair(args: argparse.Namespace) -> int:
    from ..search.repair import repair_study

    repaired = repair_study(args.name, args.storage_path, tracking_uri=args.tracking_uri, run_id=args.run_id)
    if repaired is None:
        print(f"study {args.name}: its state reads; nothing to repair")
        return 0
    print(repaired.line())
    return 0


def study_run(args: argparse.Namespace) -> int:
    from ..search.study import load_study
    from ..search.tuner import run_study

    study = load_study(args.study, args.overrides)
    outcome = run_study(study, address=args.address, verbose=args.verbose, warm_start=args.warm_start)
    return finish_study(outcome, study.base_config.storage_path)


def study_extend(args: argparse.Namespace) -> int:
    from ..search.extend import check_add, extend_study

    check_add(args.add)  # before anything is read or started
    outcome = extend_study(
        args.name, args.add, storage_path=args.storage_path, address=args.address, verbose=args.verbose
    )
    return finish_study(outcome, args.storage_path)


def study_plan(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..planning.cost_plan import plan_study
    from ..search.study import load_study

    if args.gpus is not None and args.gpus < 0:
        raise ConfigError(f"--gpus: {args.gpus} is not a number of GPUs")
    if args.gpu_mem is not None and not args.gpu_mem > 0:
        raise ConfigError(f"--gpu-mem: {args.gpu_mem} is not a GPU's memory in GiB")
    if args.images is not None and args.images < 1:
        raise ConfigError(f"--images: {args.images} is not a number of training images")
    if args.price is not None and not 0 <= args.price < float("inf"):
        raise ConfigError(f"--price: {args.price:g} is not a price in USD per GPU-hour")
    if args.gpu_type is not None:  # before the study is read: `pack: auto` may probe this machine's GPU
        from ..planning.reference_rates import check_gpu_type, read_rows

        check_gpu_type(args.gpu_type, read_rows())
    gpu_mem = [] if args.gpu_mem is None else [f"resources_per_trial.gpu_mem_gib={args.gpu_mem}"]
    study = load_study(args.study, [*(args.overrides or []), *gpu_mem])
    plan = plan_study(
        study.workload(),
        gpus=args.gpus,
        address=args.address,
        probe=args.probe,
        images=args.images,
        gpu_type=args.gpu_type,
        price=args.price,
    )
    print(plan.text(), end="")
    return 0


def study_resume(args: argparse.Namespace) -> int:
    from ..search.tuner import resume_study

    outcome = resume_study(
        args.name,
        storage_path=args.storage_path,
        address=args.address,
        retry_failed=args.retry_failed,
        verbose=args.verbose,
    )
    return finish_study(outcome, args.storage_path)


def study_best(args: argparse.Namespace) -> int:
    from ..comparisons.reproduce import write_best
    from ..search.report import format_ranking
    from ..search.results import fidelity_from_state, outcome_from_state
    from ..search.state import load_state, study_from_state
    from ..search.validate import validation_answer

    state = load_state(args.name, args.storage_path)
    outcome = outcome_from_state(args.name, args.storage_path)
    print(format_ranking(outcome, state.metric))
    best = outcome.best
    if best is None:
        print("no trial has finished yet", file=sys.stderr)
        return 1
    print(f"best: {best.trial_id} {state.metric}={best.metric:.4f} run {best.run_id}")
    answer = validation_answer(study_from_state(state))
    print(f"answer (validated over fresh seeds): {answer}" if answer else noise_note(outcome, args.name))
    fidelity = fidelity_from_state(state, outcome)  # could ASHA's first rung tell the points apart?
    if fidelity is not None and (warning := fidelity.warning()):
        print(warning, file=sys.stderr)
    if args.out:
        path = write_best(state.tracking_uri, best.run_id, args.out, state.metric, best.metric)
        print(f"wrote {path}; reproduce it with: pisa reproduce {path}")
    if args.register is not None:
        from ..tracking.registry import register_run

        print_registered(register_run(state.tracking_uri, best.run_id, args.register or state.name))
    return 0


def noise_note(outcome, name: str) -> str:
    """Whether the winner's lead over the runner-up is larger than the seed noise."""
    from ..core.stats import paired
    from ..tracking.tags import Status

    ranked = [t for t in outcome.trials if t.status != Status.FAILED and t.metric is not None]
    if len(ranked) < 2:
        return "only one ranked trial: nothing to compare it with"
    first, second = ranked[0], ranked[1]
    gap = first.metric - second.metric
    check = f"check with `pisa study validate {name} --top 2 --seeds 5`"
    p = paired(first.seed_values, second.seed_values)
    if p.difference.ci_low is None:
        return (
            f"one seed per point: the gap to the runner-up ({second.trial_id}, {gap:+.4f}) cannot be told "
            f"from seed noise; {check}"
        )
    d = p.difference
    span = f"paired difference {d.mean:+.4f}, 95% CI [{d.ci_low:+.4f}, {d.ci_high:+.4f}] over {len(p.seeds)} seeds"
    if p.significant:
        return f"the winner is ahead of the runner-up ({second.trial_id}) beyond the seed noise: {span}"
    return f"the winner is within the noise of the runner-up ({second.trial_id}): {span}; {check}"


def study_validate(args: argparse.Namespace) -> int:
    from ..comparisons.table import format_validation
    from ..search.validate import validate_study

    result = validate_study(
        args.name,
        top=args.top,
        seeds=args.seeds,
        storage_path=args.storage_path,
        first_seed=args.first_seed,
        address=args.address,
        verbose=args.verbose,
    )
    assert result is not None  # only the study's own stage is skipped when done before
    print(format_validation(result))
    print(f"logged to MLflow run {result.run_id} ({result.tracking_uri})")
    return 0 if result.ok else 1


def study_report(args: argparse.Namespace) -> int:
    from ..search.report import log_study_report
    from ..search.results import outcome_from_state
    from ..search.state import load_state, study_from_state

    state = load_state(args.name, args.storage_path)
    outcome = outcome_from_state(args.name, args.storage_path)
    names = log_study_report(outcome, study_from_state(state))
    print(f"logged {', '.join(names)} to MLflow run {state.parent_run_id}")
    return 0
