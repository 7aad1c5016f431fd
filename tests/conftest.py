"""Shared fixtures: the real BCCD dataset and a small generated synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_bccd() -> Path:
    """`$PISA_BCCD_DIR`, else `<repo>/../shared/datasets/bccd` (CI keeps shared/ beside the clone)."""
    env = os.environ.get("PISA_BCCD_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "bccd"


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    path = find_bccd()
    needed = [path / "train.json", path / "val.json", path / "images"]
    if not all(p.exists() for p in needed):
        pytest.fail(
            f"BCCD dataset not found at {path} (needs train.json, val.json, images/). "
            "Put shared/datasets/bccd beside the repository or set PISA_BCCD_DIR.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shapes dataset (24 train, 8 val images), generated once per session."""
    from pisa.data import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n_train=24, n_val=8, seed=0)
    return out
