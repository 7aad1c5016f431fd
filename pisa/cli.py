"""The `pisa` command: thin argument parsing that delegates to the modules."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from pathlib import Path
from typing import cast

from . import __version__
from .core.errors import PisaError
from .training import signals

# Each command imports what it needs when it runs: `import pisa.cli` (and `pisa --help`) loads
# neither Ray, torch nor MLflow, and Ray's exit handler is only registered by a command that
# starts it (tests/test_errors.py).

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    """The whole command line in one place. Long, not complex: one declaration per
    sub-command and option, read top to bottom like `pisa --help`."""
    parser = argparse.ArgumentParser(
        prog="pisa",
        description="Hyperparameter studies of PISA detectors (Ray Train + Tune + Optuna + MLflow).",
    )
    parser.add_argument("--version", action="version", version=f"pisa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", metavar="ACTION")
    synth = data.add_parser("synth", help="generate the synthetic COCO-format dataset")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--train", type=int, default=64, help="training images")
    synth.add_argument("--val", type=int, default=16, help="validation images")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128)
    synth.set_defaults(func=_data_synth)

    train = sub.add_parser("train", help="train one config with Ray Train, tracked in MLflow")
    train.add_argument("config", help="training config YAML")
    _add_set(train)
    train.add_argument("--workers", type=int, help="Ray Train workers (default: the config's, 8)")
    train.add_argument("--cpu", action="store_true", help="train on CPU workers (gloo backend)")
    train.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    train.add_argument("--resume", help="checkpoint directory or file to continue from")
    train.add_argument("--run-name", help="MLflow run name")
    train.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output on the console")
    _add_register(train, "the config's name")
    train.set_defaults(func=_train)

    study = sub.add_parser("study", help="hyperparameter studies (Ray Tune + Optuna)").add_subparsers(
        dest="study_command", metavar="ACTION"
    )
    run = study.add_parser("run", help="run a study file")
    run.add_argument("study", help="study YAML (see studies/)")
    _add_set(run)
    run.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own output (worker logs, Tune's result tables) on the console",
    )
    run.set_defaults(func=_study_run)
    plan = study.add_parser("plan", help="what a study will cost (GPU-hours, wall time) before it starts")
    plan.add_argument("study", help="study YAML (see studies/)")
    _add_set(plan)
    plan.add_argument(
        "--gpus", type=int, metavar="N", help="assume a cluster of N GPUs (no Ray is started); default: this machine"
    )
    plan.add_argument(
        "--probe", action="store_true", help="time a few training steps on this machine's device for the rate"
    )
    plan.add_argument("--address", help="Ray cluster address whose resources the trials share (default: this machine)")
    plan.add_argument(
        "--gpu-mem",
        type=float,
        metavar="GIB",
        help="pack: auto: assume GPUs of GIB GiB (resources_per_trial.gpu_mem_gib); default: this machine's GPU",
    )
    plan.set_defaults(func=_study_plan)
    resume = study.add_parser("resume", help="continue an interrupted study")
    resume.add_argument("name", help="study name (or its directory)")
    resume.add_argument("--storage-path", default="ray_results")
    resume.add_argument("--address")
    resume.add_argument(
        "--retry-failed", action="store_true", help="also continue failed trials from their last checkpoint"
    )
    resume.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output on the console")
    resume.set_defaults(func=_study_resume)
    best = study.add_parser("best", help="rank the trials; write the best trial's config")
    best.add_argument("name")
    best.add_argument("--storage-path", default="ray_results")
    best.add_argument("--out", help="write the best trial's training config here (e.g. best.yaml)")
    _add_register(best, "the study's name")
    listing = study.add_parser("list", help="the studies under a storage path: status, trials, best metric")
    listing.add_argument("--storage-path", default="ray_results")
    listing.set_defaults(func=_study_list)
    best.set_defaults(func=_study_best)
    val = study.add_parser(
        "validate",
        help="retrain the top points, the baseline and the paper's defaults "
        "over N seeds; compare with confidence intervals",
    )
    val.add_argument("name", help="study name (or its directory)")
    val.add_argument("--top", type=int, default=3, help="how many of the best trials to re-check (default 3)")
    val.add_argument("--seeds", type=int, default=5, help="seeds per variant, the same for all (default 5)")
    val.add_argument(
        "--first-seed", type=int, help="first seed (default: the one after the seeds the study trained with)"
    )
    val.add_argument("--storage-path", default="ray_results")
    val.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    val.add_argument("-v", "--verbose", action="store_true", help="show the trainings' and Ray's output")
    val.set_defaults(func=_study_validate)
    report = study.add_parser("report", help="(re)make the study's plots and tables in MLflow")
    report.add_argument("name")
    report.add_argument("--storage-path", default="ray_results")
    report.set_defaults(func=_study_report)

    cmp = sub.add_parser("compare", help="train configs on the same seeds; compare each with the first, with intervals")
    cmp.add_argument("configs", nargs="+", metavar="CONFIG", help="training config YAMLs; the first is the reference")
    _add_grid_options(cmp, "compare-<time>")
    cmp.set_defaults(func=_compare)

    paper = sub.add_parser("paper", help="the paper's table: each PISA config against its baseline, over N seeds")
    paper.add_argument(
        "--detectors",
        default="all",
        help="comma-separated rows (faster_rcnn_r50, retinanet_r50, ...) or all (default)",
    )
    paper.add_argument("--configs", default="configs", help="directory of the paired configs (default configs/)")
    _add_grid_options(paper, "paper-<time>")
    paper.set_defaults(func=_paper)

    pred = sub.add_parser("predict", help="run a trained detector on images: COCO results JSON, drawn PNGs")
    pred.add_argument("model", help="models:/NAME@champion, an MLflow run id, or a checkpoint file/directory")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument("--out", help="COCO results JSON to write (e.g. preds.json)")
    pred.add_argument("--draw", metavar="DIR", help="write each image with its detections drawn, as DIR/NAME.png")
    pred.add_argument("--score-thr", type=float, default=0.3, help="keep detections scoring at least this (0.3)")
    pred.add_argument("--annotations", help="COCO file whose image ids the results should use")
    pred.add_argument(
        "--tracking-uri", help="MLflow store of models:/ URIs and run ids (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    pred.set_defaults(func=_predict)

    rep = sub.add_parser("reproduce", help="retrain a run's config (RUN_ID or best.yaml) and compare")
    rep.add_argument("source", help="an MLflow run id or a config YAML written by `pisa study best`")
    rep.add_argument("--tracking-uri", help="where RUN_ID lives (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    rep.add_argument("--address")
    _add_set(rep)
    rep.set_defaults(func=_reproduce)
    return parser


def _finish_study(outcome, storage_path: str | None = None) -> int:
    from .core.uris import public_uri
    from .study.report import format_ranking

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


def _add_register(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--register",
        nargs="?",
        const="",
        default=None,
        metavar="MODEL_NAME",
        help=f"log the weights as an MLflow model, register it (default name: {default}) and set its alias 'champion'",
    )


def _print_registered(registered) -> None:
    print(
        f"registered {registered.model_uri} (version {registered.version}) from run {registered.run_id}; "
        f"use it with: pisa predict {registered.model_uri} IMAGE..."
    )


def _study_list(args: argparse.Namespace) -> int:
    from .study.results import list_studies

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
        )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .tracking.predict import predict_files

    run = predict_files(
        args.model,
        args.images,
        out=args.out,
        draw_dir=args.draw,
        score_thr=args.score_thr,
        annotations=args.annotations,
        tracking_uri=args.tracking_uri,
    )
    print(
        f"{len(run.results)} detections (score >= {args.score_thr}) in {run.num_images} images"
        + (f"; wrote {args.out}" if args.out else "")
        + (f"; drew {len(run.drawn)} images into {args.draw}" if args.draw else "")
    )
    if not args.out and not args.draw:
        import json

        print(json.dumps(run.results))
    return 0


def _study_run(args: argparse.Namespace) -> int:
    from .study.loading import load_study
    from .study.tuner import run_study

    study = load_study(args.study, args.overrides)
    return _finish_study(run_study(study, address=args.address, verbose=args.verbose), study.base_config.storage_path)


def _study_plan(args: argparse.Namespace) -> int:
    from .core.errors import ConfigError
    from .study.loading import load_study
    from .study.plan import plan_study

    if args.gpus is not None and args.gpus < 0:
        raise ConfigError(f"--gpus: {args.gpus} is not a number of GPUs")
    if args.gpu_mem is not None and not args.gpu_mem > 0:
        raise ConfigError(f"--gpu-mem: {args.gpu_mem} is not a GPU's memory in GiB")
    gpu_mem = [] if args.gpu_mem is None else [f"resources_per_trial.gpu_mem_gib={args.gpu_mem}"]
    study = load_study(args.study, [*(args.overrides or []), *gpu_mem])
    print(plan_study(study, gpus=args.gpus, address=args.address, probe=args.probe).text(), end="")
    return 0


def _study_resume(args: argparse.Namespace) -> int:
    from .study.tuner import resume_study

    outcome = resume_study(
        args.name,
        storage_path=args.storage_path,
        address=args.address,
        retry_failed=args.retry_failed,
        verbose=args.verbose,
    )
    return _finish_study(outcome, args.storage_path)


def _study_best(args: argparse.Namespace) -> int:
    from .study.report import format_ranking
    from .study.reproduce import write_best
    from .study.results import fidelity_from_state, outcome_from_state
    from .study.state import load_state

    state = load_state(args.name, args.storage_path)
    outcome = outcome_from_state(args.name, args.storage_path)
    print(format_ranking(outcome, state.metric))
    best = outcome.best
    if best is None:
        print("no trial has finished yet", file=sys.stderr)
        return 1
    print(f"best: {best.trial_id} {state.metric}={best.metric:.4f} run {best.run_id}")
    print(_noise_note(outcome, args.name))
    fidelity = fidelity_from_state(state, outcome)  # could ASHA's first rung tell the points apart?
    if fidelity is not None and (warning := fidelity.warning()):
        print(warning, file=sys.stderr)
    if args.out:
        path = write_best(state.tracking_uri, best.run_id, args.out, state.metric, best.metric)
        print(f"wrote {path}; reproduce it with: pisa reproduce {path}")
    if args.register is not None:
        from .tracking.registry import register_run

        _print_registered(register_run(state.tracking_uri, best.run_id, args.register or state.name))
    return 0


def _noise_note(outcome, name: str) -> str:
    """Whether the winner's lead over the runner-up is larger than the seed noise."""
    from .core.stats import paired
    from .tracking.tags import Status

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


def _study_validate(args: argparse.Namespace) -> int:
    from .study.comparison import format_validation
    from .study.validate import validate_study

    result = validate_study(
        args.name,
        top=args.top,
        seeds=args.seeds,
        storage_path=args.storage_path,
        first_seed=args.first_seed,
        address=args.address,
        verbose=args.verbose,
    )
    print(format_validation(result))
    print(f"logged to MLflow run {result.run_id} ({result.tracking_uri})")
    return 0 if result.ok else 1


def _study_report(args: argparse.Namespace) -> int:
    from .study.report import log_study_report
    from .study.results import outcome_from_state
    from .study.state import load_state, study_from_state

    state = load_state(args.name, args.storage_path)
    outcome = outcome_from_state(args.name, args.storage_path)
    names = log_study_report(outcome, study_from_state(state))
    print(f"logged {', '.join(names)} to MLflow run {state.parent_run_id}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .study.reproduce import format_comparison, reproduce

    result = reproduce(args.source, tracking_uri=args.tracking_uri, address=args.address, overrides=args.overrides)
    print(format_comparison(result))
    return 0 if result.status == "FINISHED" else 1


def _add_grid_options(p: argparse.ArgumentParser, default_name: str) -> None:
    """What `compare` and `paper` share: seeds, overrides, name, storage, metric, cluster."""
    p.add_argument("--seeds", type=int, default=3, help="seeds per config, the same for all (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    _add_set(p)
    p.add_argument("--name", help=f"name (default {default_name}); the same name again continues a cut-short run")
    p.add_argument("--storage-path", default="ray_results")
    p.add_argument("--metric", default="bbox_mAP", help="the final-epoch metric compared (default bbox_mAP)")
    p.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the trainings' and Ray's output")


def _compare(args: argparse.Namespace) -> int:
    from .study.compare import load_entries, run_compare, seed_list
    from .study.comparison import format_per_class, format_validation

    entries = load_entries(args.configs, args.overrides)
    result = run_compare(
        entries,
        seeds=seed_list(args.seeds, args.first_seed),
        name=args.name,
        storage_path=args.storage_path,
        metric=args.metric,
        address=args.address,
        verbose=args.verbose,
    )
    print(format_validation(result))
    print(format_per_class(result), end="")
    print(f"logged to MLflow run {result.run_id} ({result.tracking_uri})")
    return 0 if result.ok else 1


def _paper(args: argparse.Namespace) -> int:
    from .study.compare import run_compare, seed_list
    from .study.paper import format_paper, log_paper, paper_entries, paper_rows

    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    entries, pairs = paper_entries(args.configs, detectors, args.overrides)
    result = run_compare(
        entries,
        seeds=seed_list(args.seeds, args.first_seed),
        name=args.name or f"paper-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=args.storage_path,
        metric=args.metric,
        address=args.address,
        verbose=args.verbose,
        title="PISA vs baseline",
    )
    rows = paper_rows(result, entries, pairs)
    log_paper(result, rows)
    print(format_paper(result, rows))
    print(f"logged to MLflow run {result.run_id} ({result.tracking_uri})")
    return 0 if result.ok else 1


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.isr_p.k=1.5 (repeatable)",
    )


def _train(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .training.train import run_training

    overrides = list(args.overrides)
    if args.workers:
        overrides.append(f"train.workers={args.workers}")
    if args.cpu:
        overrides.append("train.use_gpu=false")
    cfg = load_config(args.config, overrides)
    outcome = run_training(
        cfg,
        address=args.address,
        run_name=args.run_name,
        resume_from=args.resume,
        verbose=args.verbose,
        source=str(args.config),
    )
    print(outcome.to_json())
    if outcome.status != "FINISHED":
        return 1
    if args.register is not None and not outcome.checkpoint_dir:
        print("nothing to register: the training left no checkpoint", file=sys.stderr)
        return 1
    if args.register is not None:
        from .tracking.registry import log_detector_model

        registered = log_detector_model(
            cfg.tracking.resolved_uri(),
            cast(str, outcome.run_id),
            cast(str, outcome.checkpoint_dir),
            args.register or cfg.name,
        )
        _print_registered(registered)
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import synth_command

    synth_command(args.out, args.train, args.val, args.seed, args.image_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except PisaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted" + (" (SIGTERM)" if signals.terminated() else ""), file=sys.stderr)
        return signals.interrupt_exit_code()


def run() -> None:
    """The `pisa` command. Once its exit handlers have run (Ray's shutdown, MLflow's flush),
    the process ends without the interpreter's teardown, which spends 2-4 s freeing the
    modules of torch, Ray and MLflow one by one for nothing a finished command needs."""
    code = 1  # an uncaught exception: its traceback is printed, then this code

    def end_now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(end_now)  # registered first, so it runs after every other handler
    signals.install()
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    sys.exit(code)


if __name__ == "__main__":
    run()
