"""Helpers the test modules share: the repository root, the tiny training config every
end-to-end test trains, and a study file around it; a benchmark script loaded as a module.
(Fixtures live in conftest.py.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import yaml

from pisa import tracking
from pisa.core.small_configs import tiny_experiment  # the tiny training config, shared with benchmarks/

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """`benchmarks/<name>.py` as the module `name`, loaded from its file (the tests of a benchmark's
    own functions): registered in `sys.modules`, where its dataclasses and pickled functions look
    their module up."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_study(tmp: Path, data_dir: Path, name: str, uri: str | None = None, **study) -> Path:
    base = tiny_experiment(data_dir, tmp)
    if uri:
        base["tracking"]["uri"] = uri
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": name,
        "base": "base.yaml",
        "search_space": {
            "model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0},
            "model.isr_p.bias": {"type": "uniform", "low": 0.0, "high": 0.5},
        },
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "resources_per_trial": {"workers": 1, "gpus_per_worker": 0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "seed": 0,
        **study,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def children(uri: str, experiment: str, parent: str):
    return tracking.tracker(uri).children(experiment, parent)


def mlflow_client(uri: str):
    """MLflow's own client of the store at `uri`: the one pisa's tracker writes through (private to
    `pisa.tracking`), for the tests that read runs, metrics and artifacts the way MLflow has them."""
    return tracking.tracker(uri)._client
