"""What earlier versions pickled still loads: a study's Tune state and a registered model
name their classes by the module paths before the package was split into layers."""

from __future__ import annotations

import pickle

import pytest


@pytest.mark.parametrize(
    "old,new",
    [
        ("pisa.registry\nPisaDetectorModel", "pisa.tracking.registry"),
        ("pisa.study\nMlflowStudyLogger", "pisa.study.mlflow_logger"),
        ("pisa.study\nrun_trial", "pisa.study.trial"),
        ("pisa.console\nStudyConsole", "pisa.study.console"),
        ("pisa.optuna_storage\nPruningOptunaSearch", "pisa.study.optuna_storage"),
        ("pisa.study_config\nStudy", "pisa.study.loading"),
        ("pisa.config\nExperimentConfig", "pisa.core.config"),
    ],
)
def test_a_pickle_naming_an_old_module_path_loads_todays_object(old, new):
    import importlib

    found = pickle.loads(f"c{old}\n.".encode())  # protocol 0: a global by module and name
    assert found is getattr(importlib.import_module(new), old.split("\n")[1])


def test_an_unknown_name_of_the_old_study_module_is_an_attribute_error():
    import pisa.study

    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pisa.study.nothing  # noqa: B018
