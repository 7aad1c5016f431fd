"""The version pisa writes into what it saves (a study's state, a registered model), and the
rule for reading it back: what a release pickled (Tune's state, a pyfunc model) names its
classes by module path, so only the same minor release is sure to load it."""

from __future__ import annotations

from .errors import PisaError, StudyError

VERSION = "0.2.0"
UNVERSIONED = "< 0.2.0"  # what wrote a state or model that records no version


def release(version: str) -> tuple[int, ...]:
    """The (major, minor) a version belongs to: "0.2.1" -> (0, 2)."""
    return tuple(int(p) for p in version.split(".")[:2])


def compatible(written: str | None) -> bool:
    return written is not None and release(written) == release(VERSION)


def check_written_by(written: str | None, what: str, remedy: str, error: type[PisaError] = StudyError) -> None:
    """One line naming both versions, and what to do, when `what` was written by another
    release (a state without a version comes from before versions were recorded)."""
    if compatible(written):
        return
    raise error(f"{what} was written by pisa {written or UNVERSIONED}; this is pisa {VERSION}: {remedy}")
