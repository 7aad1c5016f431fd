"""The one output path for what a user reads while pisa works: `[pisa] ...` lines on
stdout, flushed at once (Ray forwards a worker's stdout line by line, and the study
console recognises these lines among Ray's own). Warnings for developers go through
`logging` instead."""

from __future__ import annotations


def say(msg: str) -> None:
    print(f"[pisa] {msg}", flush=True)
