"""The `pisa` command: thin argument parsing that delegates to the modules."""

from __future__ import annotations

import argparse
import sys

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
    return parser


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
