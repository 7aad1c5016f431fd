"""The `pisa` command: thin argument parsing that delegates to the modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
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
    train.set_defaults(func=_train)

    study = sub.add_parser("study", help="hyperparameter studies (Ray Tune + Optuna)").add_subparsers(
        dest="study_command", metavar="ACTION")
    run = study.add_parser("run", help="run a study file")
    run.add_argument("study", help="study YAML (see studies/)")
    _add_set(run)
    run.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show Ray's own output (worker logs, Tune's result tables) on the console")
    run.set_defaults(func=_study_run)
    resume = study.add_parser("resume", help="continue an interrupted study")
    resume.add_argument("name", help="study name (or its directory)")
    resume.add_argument("--storage-path", default="ray_results")
    resume.add_argument("--address")
    resume.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output on the console")
    resume.set_defaults(func=_study_resume)
    best = study.add_parser("best", help="rank the trials; write the best trial's config")
    best.add_argument("name")
    best.add_argument("--storage-path", default="ray_results")
    best.add_argument("--out", help="write the best trial's training config here (e.g. best.yaml)")
    best.set_defaults(func=_study_best)
    report = study.add_parser("report", help="(re)make the study's plots and tables in MLflow")
    report.add_argument("name")
    report.add_argument("--storage-path", default="ray_results")
    report.set_defaults(func=_study_report)

    rep = sub.add_parser("reproduce", help="retrain a run's config (RUN_ID or best.yaml) and compare")
    rep.add_argument("source", help="an MLflow run id or a config YAML written by `pisa study best`")
    rep.add_argument("--tracking-uri", help="where RUN_ID lives (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    rep.add_argument("--address")
    _add_set(rep)
    rep.set_defaults(func=_reproduce)
    return parser


def _finish_study(outcome) -> int:
    from .report import format_ranking

    print(format_ranking(outcome, outcome.metric, limit=20))
    best = outcome.best
    if best is not None:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        print(f"best trial: {best.trial_id} ({params}): {outcome.metric} {best.metric:.4f}, MLflow run {best.run_id}")
    uri = outcome.tracking_uri
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    mlflow_cmd = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    ui = (f"{mlflow_cmd} ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000"
          if not uri.startswith("http") else f"open {uri}")
    print(f"compare the trials in the MLflow UI:  {ui}")
    if outcome.interrupted:
        print(f"study interrupted: continue it with `pisa study resume {outcome.name}`")
        return 130
    return 0


def _study_run(args: argparse.Namespace) -> int:
    from .study import run_study
    from .study_config import load_study

    study = load_study(args.study, args.overrides)
    return _finish_study(run_study(study, address=args.address, verbose=args.verbose))


def _study_resume(args: argparse.Namespace) -> int:
    from .study import resume_study

    return _finish_study(resume_study(args.name, storage_path=args.storage_path, address=args.address,
                                      verbose=args.verbose))


def _study_best(args: argparse.Namespace) -> int:
    from .report import format_ranking
    from .reproduce import write_best
    from .study import load_state, outcome_from_state

    state = load_state(args.name, args.storage_path)
    outcome = outcome_from_state(args.name, args.storage_path)
    print(format_ranking(outcome, state["metric"]))
    best = outcome.best
    if best is None:
        print("no trial has finished yet", file=sys.stderr)
        return 1
    print(f"best: {best.trial_id} {state['metric']}={best.metric:.4f} run {best.run_id}")
    if args.out:
        path = write_best(state["tracking_uri"], best.run_id, args.out, state["metric"], best.metric)
        print(f"wrote {path}; reproduce it with: pisa reproduce {path}")
    return 0


def _study_report(args: argparse.Namespace) -> int:
    from .report import log_study_report
    from .study import load_state, outcome_from_state
    from .study_config import load_study

    state = load_state(args.name, args.storage_path)
    outcome = outcome_from_state(args.name, args.storage_path)
    names = log_study_report(outcome, load_study(state["study_file"]))
    print(f"logged {', '.join(names)} to MLflow run {state['parent_run_id']}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .reproduce import format_comparison, reproduce

    result = reproduce(args.source, tracking_uri=args.tracking_uri, address=args.address,
                       overrides=args.overrides)
    print(format_comparison(result))
    return 0 if result["status"] == "FINISHED" else 1


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.isr_p.k=1.5 (repeatable)")


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import run_training, summary_json

    overrides = list(args.overrides)
    if args.workers:
        overrides.append(f"train.workers={args.workers}")
    if args.cpu:
        overrides.append("train.use_gpu=false")
    cfg = load_config(args.config, overrides)
    outcome = run_training(cfg, address=args.address, run_name=args.run_name, resume_from=args.resume)
    print(summary_json(outcome))
    return 0 if outcome.status == "FINISHED" else 1


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
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, RuntimeError) as exc:
        if type(exc).__name__ in ("DataError", "TrackingError", "BackboneLoadError"):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
