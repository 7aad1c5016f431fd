"""Damaged files end in a `damaged` row, a one-line error, a fallback or a repair, never a
traceback: a study state cut short (`pisa study list`, `best`, `resume`, `repair`), a study
whose MLflow run was deleted, a trial's latest checkpoint present but unreadable, and the
writes that make such damage unlikely (temporary file, fsync, rename). No Ray is started."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import torch
from helpers import write_study

from pisa import cli, tracking
from pisa.core import storage
from pisa.core.checkpoint import CHECKPOINT_FILE, Checkpoint, write_checkpoint
from pisa.core.config import flatten
from pisa.search.paths import state_path, study_dir
from pisa.search.state import load_state, save_state
from pisa.search.study import Study, load_study
from pisa.tracking import tags as tag
from pisa.tracking.tags import Kind
from pisa.training import ray_private
from pisa.trials import recovery

# ---------------------------------------------------------------- atomic writes


def test_a_local_write_is_synced_and_renamed_and_a_failed_one_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "state.json"
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    storage.write_text(str(target), "first")
    assert target.read_text() == "first"
    assert len(synced) == 2  # the file, then its folder (the rename)
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temporary file left

    with pytest.raises(RuntimeError), storage.atomic_path(target) as tmp:
        tmp.write_text("half of the sec")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_a_file_uri_and_another_file_system_are_written_whole(tmp_path, monkeypatch):
    storage.write_text((tmp_path / "a.json").as_uri(), "local by URI")
    assert (tmp_path / "a.json").read_text() == "local by URI"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    # a file system that is no object store (pyarrow's mock one stands for HDFS): a temporary file, moved
    fs = pafs.FileSystem.from_uri("mock:///")[0]
    monkeypatch.setattr(storage, "_fs", lambda location: (fs, "dir/state.json"))
    storage.write_text("mock://dir/state.json", "remote")
    with fs.open_input_stream("dir/state.json") as f:
        assert f.read() == b"remote"
    assert [i.base_name for i in fs.get_file_info(pafs.FileSelector("dir"))] == ["state.json"]


def test_a_checkpoint_is_written_whole(tmp_path):
    path = write_checkpoint(tmp_path, _checkpoint(0))
    assert path == tmp_path / CHECKPOINT_FILE and sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    assert recovery._damage(pafs.LocalFileSystem(), str(tmp_path), CHECKPOINT_FILE) is None


# ---------------------------------------------------------------- a study state, damaged


def _started(tmp_path: Path, synthetic_dir: Path, name: str = "cut") -> Study:
    """A study as `pisa study run` leaves it before its first trial: its MLflow run with the
    study's params and files (as `pisa.search.tuner.run_study` logs them) and its state."""
    study = load_study(write_study(tmp_path, synthetic_dir, name, max_concurrent_trials=1))
    uri = study.base_config.tracking.resolved_uri()
    tracker = tracking.tracker(uri)
    parent = tracker.start_run(
        study.base_config.tracking.experiment,
        f"study {study.name}",
        params={
            "study." + k: v
            for k, v in flatten(study.cfg.model_dump(mode="json", exclude={"experiment", "search_space"})).items()
        },
        tags={tag.KIND: Kind.STUDY, tag.STUDY: study.name},
    )
    tracker.log_text(parent, study.source.read_text(), "study.yaml")
    tracker.log_text(
        parent, json.dumps(study.cfg.model_dump(mode="json")["search_space"], indent=2), "search_space.json"
    )
    tracker.log_text(parent, study.base_config.to_yaml(), "base_config.yaml")
    save_state(study, parent, uri)
    return study


def _cut(path: str) -> None:
    text = Path(path).read_bytes()
    Path(path).write_bytes(text[: len(text) // 2])


def _pisa(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (MLflow creating the store)
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cut_study(tmp_path, synthetic_dir, monkeypatch):
    study = _started(tmp_path, synthetic_dir)
    original = json.loads(Path(state_path(study)).read_text())
    _cut(state_path(study))
    monkeypatch.chdir(tmp_path)
    return study, original


def test_a_cut_state_is_a_damaged_row_and_a_one_line_error(cut_study, capsys, no_ray):
    study, _ = cut_study
    root = study.base_config.storage_path
    code, out, _ = _pisa(capsys, "study", "list", "--storage-path", root)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("cut "))
    assert " damaged " in row and "Invalid JSON" in row, out
    assert "pisa study repair" in out
    for command in ("best", "resume", "validate", "report"):
        code, out, err = _pisa(capsys, "study", command, "cut", "--storage-path", root)
        assert code == 2, (command, err)
        assert err.count("\n") == 1 and "is damaged (Invalid JSON" in err, (command, err)
        assert "pisa study repair cut" in err
        assert "Traceback" not in err + out


def test_repair_rebuilds_the_state_from_the_study_run(cut_study, capsys, no_ray):
    study, original = cut_study
    root = study.base_config.storage_path
    code, out, _ = _pisa(capsys, "study", "repair", "cut", "--storage-path", root)
    assert code == 0 and out.startswith("rebuilt the state of study 'cut' (damaged: Invalid JSON"), out
    rebuilt = json.loads(Path(state_path(study)).read_text())
    for key in ("name", "parent_run_id", "tracking_uri", "experiment", "study_file", "metric", "mode"):
        assert rebuilt[key] == original[key], key
    for key in ("num_samples", "optuna_storage", "storage_path", "pisa_version"):
        assert rebuilt[key] == original[key], key
    assert rebuilt["resolved"]["study"] == original["resolved"]["study"]
    assert rebuilt["resolved"]["base"] == original["resolved"]["base"]
    assert abs(rebuilt["created"] - original["created"]) < 60
    # the study reads again; a second repair has nothing to do
    assert load_state("cut", root).parent_run_id == original["parent_run_id"]
    code, out, _ = _pisa(capsys, "study", "repair", "cut", "--storage-path", root)
    assert code == 0 and "nothing to repair" in out


def test_repair_keeps_the_trials_and_tune_runs_study_extend_added(tmp_path, synthetic_dir, capsys, monkeypatch):
    study = _started(tmp_path, synthetic_dir, "extended")
    state = json.loads(Path(state_path(study)).read_text())
    state.update(num_samples=7, tune_runs=["extend-1", "extend-2"])
    Path(state_path(study)).write_text(json.dumps(state, indent=2))
    for run in ("extend-2", "extend-1"):
        Path(study_dir(study), run).mkdir()
        Path(study_dir(study), run, "tuner.pkl").write_bytes(pickle.dumps({}))
    _cut(state_path(study))
    monkeypatch.chdir(tmp_path)
    code, out, _ = _pisa(capsys, "study", "repair", "extended", "--storage-path", study.base_config.storage_path)
    assert code == 0, out
    rebuilt = load_state("extended", study.base_config.storage_path)
    assert rebuilt.num_samples == 7 and rebuilt.tune_runs == ["extend-1", "extend-2"]
    assert rebuilt.resolved is not None and rebuilt.resolved["study"]["num_samples"] == 7


def test_repair_without_a_state_finds_the_store_and_run_in_tunes_state(tmp_path, synthetic_dir, capsys, monkeypatch):
    study = _started(tmp_path, synthetic_dir, "lost")
    original = json.loads(Path(state_path(study)).read_text())
    Path(state_path(study)).unlink()
    # Tune's tuner.pkl holds the study's MLflow logger (its store and run): read, never unpickled
    logger = {"uri": original["tracking_uri"], "parent_run_id": original["parent_run_id"], "f": os.system}
    Path(study_dir(study), "tuner.pkl").write_bytes(pickle.dumps({"callbacks": [logger]}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no ./mlflow.db to fall back on
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, _ = _pisa(capsys, "study", "repair", "lost", "--storage-path", study.base_config.storage_path)
    assert code == 0 and "(missing)" in out, out
    rebuilt = json.loads(Path(state_path(study)).read_text())
    assert rebuilt["parent_run_id"] == original["parent_run_id"]
    for key in ("study", "base", "overrides"):  # the study file's path is not in MLflow
        assert rebuilt["resolved"][key] == original["resolved"][key]


def test_repair_without_any_store_says_so_in_one_line(tmp_path, synthetic_dir, capsys, monkeypatch):
    study = _started(tmp_path, synthetic_dir, "nowhere")
    Path(state_path(study)).write_text("{")
    monkeypatch.chdir(tmp_path / "ray_results")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = _pisa(capsys, "study", "repair", "nowhere", "--storage-path", study.base_config.storage_path)
    assert code == 2 and err.count("\n") == 1 and "--tracking-uri" in err, err
    code, _, err = _pisa(capsys, "study", "repair", "none-such", "--storage-path", study.base_config.storage_path)
    assert code == 2 and "no study 'none-such' to repair" in err


# ---------------------------------------------------------------- a deleted MLflow run


def test_a_deleted_study_run_is_one_line(tmp_path, synthetic_dir, capsys, monkeypatch, no_ray):
    study = _started(tmp_path, synthetic_dir, "orphan")
    state = load_state("orphan", study.base_config.storage_path)
    tracking.tracker(state.tracking_uri).delete_run(state.parent_run_id)
    root = study.base_config.storage_path
    code, out, _ = _pisa(capsys, "study", "list", "--storage-path", root)
    assert code == 0 and "no MLflow run" in out and "was deleted" in out, out
    for command in ("best", "report", "validate"):
        code, out, err = _pisa(capsys, "study", command, "orphan", "--storage-path", root)
        assert code == 2 and err.count("\n") == 1, (command, err)
        assert f"MLflow run {state.parent_run_id}" in err and "was deleted" in err and "mlflow runs restore" in err

    class Driver:  # resume: the store is reached and Ray started, then the run is checked
        notes: list[str] = []

        def __init__(self, *args, **kwargs):
            pass

        def start_with(self, reach, dashboard=False):
            reach()

    monkeypatch.setattr("pisa.search.tuner.DriverSession", Driver)
    code, _, err = _pisa(capsys, "study", "resume", "orphan", "--storage-path", root)
    assert code == 2 and err.count("\n") == 1 and "was deleted" in err, err


# ---------------------------------------------------------------- a corrupt latest checkpoint


def _checkpoint(epoch: int) -> Checkpoint:
    model = {"w": torch.full((64,), float(epoch))}
    return Checkpoint(model=model, optimizer={}, scheduler={}, scaler={}, epoch=epoch, iteration=epoch)


def _trial(tmp_path: Path, damage: dict[int, str]) -> tuple[SimpleNamespace, list]:
    """A restored trial as Tune has it (its checkpoint bookkeeping), with checkpoints 0..2 on
    disk, those in `damage` cut to a third ("cut") or overwritten ("garbage")."""
    from ray.tune import Checkpoint as TuneCheckpoint

    fs = pafs.LocalFileSystem()
    results = []
    for i in range(3):
        folder = tmp_path / f"checkpoint_{i:06d}"
        folder.mkdir()
        file = write_checkpoint(folder, _checkpoint(i))
        if damage.get(i) == "cut":
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
        elif damage.get(i) == "garbage":
            file.write_bytes(os.urandom(file.stat().st_size))
        results.append(ray_private.checkpoint_result(TuneCheckpoint(str(folder), filesystem=fs)))
    manager = SimpleNamespace(_checkpoint_results=list(results), _latest_checkpoint_result=results[-1])
    trial = SimpleNamespace(
        trial_id="t1",
        run_metadata=SimpleNamespace(checkpoint_manager=manager, invalidate_cache=lambda: None),
        storage=SimpleNamespace(trial_fs_path=str(tmp_path)),
    )
    return trial, results


@pytest.mark.parametrize("how", ["cut", "garbage"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, how):
    trial, results = _trial(tmp_path, {2: how})
    repair = recovery.repair_restored_trial(trial, CHECKPOINT_FILE, logged_epochs=3)
    assert repair is not None and repair.continue_from == "checkpoint_000001"
    line = repair.line()
    assert line.startswith("warning: trial t1: its last recorded checkpoint checkpoint_000002 is unreadable (")
    assert line.endswith("; continuing from checkpoint_000001") and "\n" not in line
    manager = trial.run_metadata.checkpoint_manager
    assert manager._latest_checkpoint_result is results[1]
    assert results[2] not in manager._checkpoint_results


def test_no_usable_checkpoint_is_one_line_and_a_start_from_scratch(tmp_path):
    trial, _ = _trial(tmp_path, {0: "cut", 1: "garbage", 2: "cut"})
    repair = recovery.repair_restored_trial(trial, CHECKPOINT_FILE, logged_epochs=3)
    assert repair is not None and repair.continue_from is None and repair.damage
    end = f"is unreadable ({repair.damage}); continuing from scratch (no usable checkpoint left)"
    assert repair.line().endswith(end)
    assert trial.run_metadata.checkpoint_manager._latest_checkpoint_result is None


def test_an_intact_latest_checkpoint_is_kept(tmp_path):
    trial, results = _trial(tmp_path, {0: "cut"})
    assert recovery.repair_restored_trial(trial, CHECKPOINT_FILE, logged_epochs=3) is None
    assert trial.run_metadata.checkpoint_manager._latest_checkpoint_result is results[2]
