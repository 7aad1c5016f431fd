"""Waiting for a server one started (an MLflow server, an S3 server) to answer HTTP: what the
test harness and the chaos benchmark both do before they use one."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable


class ServiceDown(RuntimeError):
    """The server exited, or did not answer in time."""


def wait_for_http(url: str, exit_code: Callable[[], int | None], what: str, timeout: float, interval: float) -> None:
    """Return once `url` answers (any HTTP status counts: the server is up); `exit_code()` is the
    server process's (None while it runs), checked between tries so a crash is not waited out."""
    deadline = time.monotonic() + timeout
    while True:
        code = exit_code()
        if code is not None:
            raise ServiceDown(f"{what} exited ({code})")
        try:
            with urllib.request.urlopen(url, timeout=3):  # noqa: S310 (a local server the caller started)
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServiceDown(f"{what} not up after {timeout:.0f} s")
        time.sleep(interval)
