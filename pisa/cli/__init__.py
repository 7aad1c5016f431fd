"""The `pisa` command: thin argument parsing that delegates to the modules.

Each command imports what it needs when it runs: `import pisa.cli` (and `pisa --help`) loads
neither Ray, torch nor MLflow, and Ray's exit handler is only registered by a command that
starts it (tests/test_errors.py).
"""

from __future__ import annotations

import atexit
import os
import sys

from ..core.errors import PisaError
from ..training import signals
from .parser import build_parser

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
