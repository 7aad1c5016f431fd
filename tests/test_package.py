"""What another pisa release saved is refused in one line, naming both versions: a study's
Tune state and a registered model pickle pisa's classes by module path, which only the same
minor release is sure to have."""

from __future__ import annotations

import json
import time

import pytest

import pisa
from pisa.cli import main
from pisa.core.version import compatible


def _write_state(root, name: str, version: str | None) -> None:
    """A study's `pisa_study.json` as the given release wrote it (None: before versions)."""
    state = {
        "name": name,
        "parent_run_id": "0" * 32,
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "experiment": "old",
        "study_file": str(root / "study.yaml"),
        "metric": "bbox_mAP",
        "mode": "max",
        "created": time.time(),
        "num_samples": 2,
    }
    if version is not None:
        state["pisa_version"] = version
    (root / name).mkdir(parents=True)
    (root / name / "pisa_study.json").write_text(json.dumps(state))


@pytest.mark.parametrize("written,shown", [(None, "pisa < 0.2.0"), ("0.1.0", "pisa 0.1.0"), ("1.0.0", "pisa 1.0.0")])
def test_resuming_a_study_of_another_release_is_one_line_naming_both(tmp_path, capsys, written, shown):
    _write_state(tmp_path, "old", written)
    code = main(["study", "resume", "old", "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert f"written by {shown}" in err and "this is pisa 0.2.0" in err and "resume it with that version" in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing started: no store was opened


def test_the_release_rule():
    assert pisa.__version__ == "0.2.0"
    assert compatible("0.2.0") and compatible("0.2.7")
    assert not compatible(None) and not compatible("0.1.0") and not compatible("0.3.0") and not compatible("1.2.0")


@pytest.mark.parametrize("written", ["0.1.0", "0.3.1"])
def test_loading_a_model_logged_by_another_release_is_one_line(tmp_path, written):
    import mlflow.pyfunc

    from pisa.tracking.detector import PredictInputError
    from pisa.tracking.registry import PISA_VERSION_KEY, load_pyfunc

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
        def predict(self, context, model_input, params=None):
            return model_input

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("old")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), metadata={PISA_VERSION_KEY: written})
    with pytest.raises(PredictInputError) as caught:
        load_pyfunc(info.model_uri, uri)
    message = str(caught.value)
    assert "\n" not in message
    assert f"written by pisa {written}" in message and "this is pisa 0.2.0" in message


def test_a_study_callback_pickles_ids_and_paths_and_reloads_its_study(tmp_path, synthetic_dir):
    """Tune pickles a study's callbacks with its state: they carry the study's directory, not
    its classes, and a resume reloads the study from its state file."""
    import pickle

    from helpers import write_study

    from pisa.search.console import StudyConsole
    from pisa.search.mlflow_logger import MlflowStudyLogger
    from pisa.search.state import save_state
    from pisa.search.study import load_study

    study = load_study(write_study(tmp_path, synthetic_dir, "pickled"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    save_state(study, "0" * 32, uri)
    for callback in (MlflowStudyLogger(study, uri, "0" * 32), StudyConsole(study)):
        payload = pickle.dumps(callback)
        assert b"pisa.search.schema" not in payload and b"StudyConfig" not in payload
        assert b"ExperimentConfig" not in payload and b"TuneTerminalReporter" not in payload
        back = pickle.loads(payload)
        assert back.study.name == "pickled" and back.study.cfg == study.cfg
        assert back.study.base_config.model == study.base_config.model
