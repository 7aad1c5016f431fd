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
    return parser


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
