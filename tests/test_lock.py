"""The lock: constraints.txt pins every package the project installs, from pyproject.toml's
ranges and constraints-torch.txt's pair (`make lock`), and `make` installs exactly it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from helpers import REPO
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.+))?$")


def _pins(path) -> dict[str, list[tuple[str, str | None]]]:
    """name -> [(version, marker)] of a requirements file's `name==version ; marker` lines."""
    pins: dict[str, list[tuple[str, str | None]]] = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            pins.setdefault(canonicalize_name(m.group(1)), []).append((m.group(2), m.group(3)))
    return pins


def _applies(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate()


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    return [Requirement(r) for r in [*project["dependencies"], *(r for group in extras for r in group)]]


def test_every_dependency_of_the_project_is_pinned_within_its_range():
    pins = _pins(REPO / "constraints.txt")
    for req in _project_requirements():
        versions = [v for v, marker in pins.get(canonicalize_name(req.name), []) if _applies(marker)]
        assert versions, f"{req.name} is not in constraints.txt: run `make lock`"
        for version in versions:
            assert req.specifier.contains(version, prereleases=True), (
                f"constraints.txt pins {req.name}=={version}, outside pyproject.toml's {req}: run `make lock`"
            )


def test_the_lock_holds_torch_at_the_tested_pair():
    torch_pins = _pins(REPO / "constraints-torch.txt")
    assert set(torch_pins) == {"torch", "torchvision"}
    locked = _pins(REPO / "constraints.txt")
    for name, pinned in torch_pins.items():
        assert locked[name] == pinned, f"{name}: constraints.txt {locked[name]} != constraints-torch.txt {pinned}"


def test_the_installed_packages_are_the_locked_versions():
    """What `make` installed (`pip install -c constraints.txt`) is the lock, package for
    package: a pin pip did not apply, or an install by hand, shows here. A CUDA build of the
    locked torch (2.14.1+cu126, README "GPU installs") is the locked version."""
    wrong = []
    for name, pinned in _pins(REPO / "constraints.txt").items():
        versions = [v for v, marker in pinned if _applies(marker)]
        if not versions:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra not installed here (plots, dashboard)
        if not any(SpecifierSet(f"=={v}").contains(installed, prereleases=True) for v in versions):
            wrong.append(f"{name} {installed} (locked: {', '.join(versions)})")
    assert not wrong, "installed versions that are not the lock's (`make install` again): " + "; ".join(wrong)
