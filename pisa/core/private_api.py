"""The private APIs of other libraries that pisa relies on, declared where they are used.

Each library's private uses live in one module (`pisa.training.ray_private`,
`pisa.search.optuna_storage`, `pisa.tracking.mlflow_private`), which lists them in
`PRIVATE_APIS` with the versions it was checked against (`CHECKED_AGAINST`, the lock's).
`tests/test_private_apis.py` resolves every one, so an upgrade that removes one fails there
with the attribute and the installed version named, not somewhere inside a study.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any


@dataclass(frozen=True)
class PrivateApi:
    """`module`'s `name` (dotted below the module: `Class.attr`); `instance` builds an object
    to look for `attrs` on, for attributes an object only gets in its `__init__`."""

    library: str  # the distribution whose version is checked (`ray`, `optuna`, `mlflow`)
    module: str
    name: str
    why: str
    instance: Callable[[], Any] | None = None
    attrs: tuple[str, ...] = ()

    def problem(self) -> str | None:
        """Why this API is not there in the installed library, None if it is."""
        try:
            obj: Any = importlib.import_module(self.module)
            for part in self.name.split(".") if self.name else ():
                obj = getattr(obj, part)
            target = self.instance() if self.instance is not None else obj
            missing = [a for a in self.attrs if not hasattr(target, a)]
        except Exception as exc:  # ImportError, AttributeError, a changed constructor
            return f"{type(exc).__name__}: {exc}"
        return f"no attribute(s) {', '.join(missing)}" if missing else None

    def label(self) -> str:
        name = f"{self.module}.{self.name}" if self.name else self.module
        return name + (f" ({', '.join(self.attrs)})" if self.attrs else "")


def installed(library: str) -> str:
    try:
        return version(library)
    except PackageNotFoundError:
        return "not installed"
