"""`python -m pisa.cli ...`: the `pisa` command."""

from pisa.cli import run

run()
