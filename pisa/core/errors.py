"""One error family: every failure pisa explains to its user is a `PisaError`.

The CLI catches `PisaError` once and exits with the error's `exit_code`: 2 for bad input
(a config, dataset or weights file the user can fix before anything starts), 1 for a
run that failed (diverged training, an unusable tracking store). Errors raised inside a
Ray worker reach the driver wrapped by Ray; `find_pisa_error` unwraps them structurally.
"""

from __future__ import annotations

from collections.abc import Iterator

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class PisaError(Exception):
    """Base of the errors pisa reports as one line; `exit_code` is the CLI's exit status."""

    exit_code = EXIT_FAILED


class ConfigError(PisaError, ValueError):
    """A config file or override is invalid; the message names the file and the field."""

    exit_code = EXIT_BAD_INPUT


class DataError(PisaError, ValueError):
    """A dataset file is unusable; the message names the file and the offending id."""

    exit_code = EXIT_BAD_INPUT


class BackboneLoadError(PisaError, RuntimeError):
    """A pretrained backbone checkpoint could not be used."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(PisaError, ValueError):
    """A checkpoint the user named (`pisa train --resume`) is missing or unreadable; the
    message names the file. Checked before anything starts, never retried."""

    exit_code = EXIT_BAD_INPUT


class StudyError(PisaError):
    """A study name that does not exist (or already does): nothing was started."""

    exit_code = EXIT_BAD_INPUT


class ClusterError(PisaError):
    """The Ray cluster can't run what was asked (no auth token, too few GPUs): nothing started."""

    exit_code = EXIT_BAD_INPUT


class WrappingError(PisaError):
    """A failure that stands for another one (a seed's failure fails its whole point): the
    pisa error inside it, if any, is what is reported and what decides retries and the exit
    code; without one, this error is."""


class TrackingError(PisaError, RuntimeError):
    """The MLflow tracking store can't be used; raised before any training starts."""


class NonFiniteLossError(PisaError, RuntimeError):
    """Training diverged: a loss became NaN or infinite."""


def _linked(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions Ray and Python chain to `exc`: causes, wrapped worker failures."""
    for attr in ("__cause__", "__context__", "cause"):
        linked = getattr(exc, attr, None)
        if isinstance(linked, BaseException):
            yield linked
    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
    if isinstance(failures, dict):
        for _, failure in sorted(failures.items(), key=lambda item: item[0]):
            if isinstance(failure, BaseException):
                yield failure


def find_pisa_error(exc: BaseException | None) -> PisaError | None:
    """The first `PisaError` in `exc`'s chain (breadth first), or None."""
    queue, seen = [exc] if exc is not None else [], set()
    wrapper: PisaError | None = None
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # Ray's RayTaskError(X) is an X too: X itself
        if isinstance(current, WrappingError):
            wrapper = wrapper or current
        elif isinstance(current, PisaError) and not isinstance(cause, PisaError):
            return current
        queue.extend(_linked(current))
    return wrapper


def one_line(exc: BaseException | None, fallback: str = "unknown error") -> str:
    """What to tell the user about a failure: the pisa error inside it, else its last line."""
    found = find_pisa_error(exc)
    if found is not None:
        first = str(found).strip().splitlines()
        return f"{type(found).__name__}: {first[0] if first else ''}".rstrip(": ")
    if exc is None:
        return fallback
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else (type(exc).__name__ or fallback)
