"""Every private API pisa touches is still there in the installed libraries.

Each library's private uses are listed where they are made (`PRIVATE_APIS` of
`pisa.training.ray_private`, `pisa.search.optuna_storage`, `pisa.tracking.mlflow_private`),
with the versions they were checked against. An upgrade that removes or renames one fails
here, naming the attribute, the installed version and the module to update."""

from __future__ import annotations

import pytest

from pisa.core.private_api import PrivateApi, installed
from pisa.search import optuna_storage
from pisa.tracking import mlflow_private
from pisa.training import ray_private

MODULES = [ray_private, optuna_storage, mlflow_private]
APIS = [(module, api) for module in MODULES for api in module.PRIVATE_APIS]


@pytest.mark.parametrize("module, api", APIS, ids=[f"{api.library}:{api.label()}" for _, api in APIS])
def test_private_api_is_still_there(module, api: PrivateApi):
    problem = api.problem()
    if problem is not None:
        checked = module.CHECKED_AGAINST.get(api.library, "?")
        pytest.fail(
            f"{api.library} {installed(api.library)}: {api.label()} is gone ({problem}); pisa uses it for "
            f"{api.why} and was checked against {api.library} {checked}: update {module.__name__} "
            f"({module.__file__}) and its CHECKED_AGAINST",
            pytrace=False,
        )


def test_the_versions_checked_against_are_the_locked_ones():
    """CHECKED_AGAINST follows the lock: a `make lock-upgrade` that moves a library past the
    version a module was checked against fails here until the module is checked again."""
    from pathlib import Path

    locked = {}
    for line in (Path(__file__).parents[1] / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            locked[name.strip().lower()] = version.split(";")[0].strip()
    for module in MODULES:
        for library, version in module.CHECKED_AGAINST.items():
            assert locked.get(library) == version, (
                f"{module.__name__} was checked against {library} {version}; the lock has {locked.get(library)}"
            )


def test_a_missing_attribute_is_named_with_the_library_version():
    gone = PrivateApi("optuna", "optuna.trial", "Trial", "nothing", attrs=("_no_such_attribute",))
    assert gone.problem() == "no attribute(s) _no_such_attribute"
    assert "AttributeError" in (PrivateApi("ray", "ray", "_no_such_thing", "nothing").problem() or "")
    assert installed("optuna") == __import__("optuna").__version__
