"""Module paths of earlier versions, for what they pickled: a study's Tune state (its MLflow
callback, console, Optuna searcher, trainable) and a registered model's pyfunc name their
classes by module. Before the package was split into layers these were top-level modules
(`pisa.study`, `pisa.registry`, ...); a study started, or a model registered, with such a
version still resumes and loads. Imports nothing until an old name is asked for."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED = {
    "pisa.accel": "pisa.training.device_plan",
    "pisa.cluster": "pisa.training.cluster",
    "pisa.config": "pisa.core.config",
    "pisa.console": "pisa.study.console",
    "pisa.engine": "pisa.training.engine",
    "pisa.errors": "pisa.core.errors",
    "pisa.lineage": "pisa.tracking.lineage",
    "pisa.ops": "pisa.core.pisa_math",
    "pisa.optuna_storage": "pisa.study.optuna_storage",
    "pisa.predict": "pisa.tracking.predict",
    "pisa.progress": "pisa.core.progress",
    "pisa.ray_runtime": "pisa.training.ray_runtime",
    "pisa.registry": "pisa.tracking.registry",
    "pisa.report": "pisa.study.report",
    "pisa.reproduce": "pisa.study.reproduce",
    "pisa.sampling": "pisa.core.sampling",
    "pisa.seeds": "pisa.study.seeds",
    "pisa.session": "pisa.training.session",
    "pisa.stats": "pisa.core.stats",
    "pisa.storage": "pisa.core.storage",
    "pisa.study_config": "pisa.study.loading",
    "pisa.study_schema": "pisa.study.schema",
    "pisa.train": "pisa.training.train",
    "pisa.training_grid": "pisa.study.training_grid",
}

# names the old `pisa.study` module held, by the module that holds them now
STUDY_NAMES = {
    "MlflowStudyLogger": "pisa.study.mlflow_logger",
    "run_trial": "pisa.study.trial",
    "StudyState": "pisa.study.state",
    "TrialSummary": "pisa.study.results",
    "StudyOutcome": "pisa.study.results",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module name with the module that now holds its contents."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed under its new name already."""


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())  # after the real finders: today's names win


def study_attribute(name: str):
    """An attribute of the old `pisa.study` module, from where it lives now."""
    if name not in STUDY_NAMES:
        raise AttributeError(f"module 'pisa.study' has no attribute {name!r}")
    return getattr(importlib.import_module(STUDY_NAMES[name]), name)
