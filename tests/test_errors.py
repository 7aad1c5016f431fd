"""The error family: one line, the file and field named, the exit code the kind of error."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_experiment
from ray.train import WorkerGroupError

from pisa import tracking
from pisa.cli import main
from pisa.core.errors import (
    BackboneLoadError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    StudyError,
    TrackingError,
    find_pisa_error,
    one_line,
)


@pytest.mark.parametrize(
    "cls,code",
    [
        (ConfigError, 2),
        (DataError, 2),
        (BackboneLoadError, 2),
        (StudyError, 2),
        (TrackingError, 1),
        (NonFiniteLossError, 1),
    ],
)
def test_exit_code_is_the_kind_of_error(cls, code):
    assert cls("x").exit_code == code


def test_a_worker_error_is_found_inside_rays_wrappers():
    inner = NonFiniteLossError("non-finite loss at epoch 1 iteration 3")
    wrapped = WorkerGroupError("rank 1 failed", {1: inner, 0: RuntimeError("collateral")})
    # the driver receives the error pickled: the chain must survive the round trip
    outer = RuntimeError("trial failed")
    outer.__cause__ = pickle.loads(pickle.dumps(wrapped))
    found = find_pisa_error(outer)
    assert isinstance(found, NonFiniteLossError) and "epoch 1 iteration 3" in str(found)
    assert one_line(outer) == "NonFiniteLossError: non-finite loss at epoch 1 iteration 3"


def test_an_unknown_error_is_its_last_line():
    assert one_line(RuntimeError("Traceback ...\n  line\nOSError: disk full\n")) == "OSError: disk full"
    assert find_pisa_error(ValueError("plain")) is None


def _study(tmp_path: Path, **extra) -> Path:
    spec = {
        "name": "bad",
        "experiment": {"data": {"synthetic": {"out": str(tmp_path / "data")}}},
        "search_space": {"model.isr_p.k": {"type": "uniform", "low": 0.5, "high": 3.0}},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _nothing_started(work: Path) -> bool:
    """Nothing beside the input files: no data generated, no study storage, no tracking
    store (and with `no_ray`, no Ray)."""
    return not [p.name for p in work.iterdir() if p.suffix != ".yaml" and p.name != "base"]


def test_binary_study_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "garbage.yaml"
    path.write_bytes(b"name: x\n\xff\xfe\x00\x81binary")
    code, err = _run(capsys, "study", "run", str(path))
    assert code == 2 and err.count("\n") == 0
    assert str(path) in err and "not a UTF-8 text file" in err
    assert _nothing_started(tmp_path)


def test_directory_given_as_study_file(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, "study", "run", str(tmp_path))
    assert code == 2 and err == f"error: {tmp_path}: is a directory, expected a YAML file"
    assert _nothing_started(tmp_path)


def test_directory_given_as_base_file(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    study = _study(tmp_path, base="base")
    code, err = _run(capsys, "study", "run", str(study))
    assert code == 2 and err == f"error: {study}: base: {tmp_path / 'base'}: is a directory, expected a YAML file"
    assert _nothing_started(tmp_path)


def test_point_outside_the_search_space_is_refused_not_clamped(tmp_path, capsys):
    path = _study(tmp_path, points_to_evaluate=[{"model.isr_p.k": -5}])
    code, err = _run(capsys, "study", "run", str(path))
    assert code == 2 and err.count("\n") == 0
    assert f"{path}: points_to_evaluate[0].model.isr_p.k: -5 is outside the search space" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "ray_results").exists()


def test_ray_client_with_a_local_tracking_store_fails_before_any_trial(tmp_path, capsys, monkeypatch, no_ray):
    # through Ray Client the study's logger runs on the cluster: a local file store is not there
    monkeypatch.chdir(tmp_path)
    experiment = {
        "data": {"synthetic": {"out": str(tmp_path / "data")}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'local.db'}"},
    }
    path = _study(tmp_path, experiment=experiment)
    code, err = _run(capsys, "study", "run", str(path), "--address", "ray://127.0.0.1:9")
    assert code == 2 and err.count("\n") == 0, err
    assert "tracking server" in err and "ray://" in err
    assert _nothing_started(tmp_path)


def test_unknown_study_name_is_exit_2(tmp_path, capsys):
    code, err = _run(capsys, "study", "best", "nope", "--storage-path", str(tmp_path))
    assert code == 2 and "no study 'nope'" in err


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["--version"], 0, "pisa "),
        (["--bogus"], 2, "unrecognized arguments: --bogus"),
        (["study", "run", "missing.yaml"], 2, "missing.yaml: no such file"),
        (["study", "list"], 2, "no study storage at ray_results"),
    ],
)
def test_the_pisa_command_exits_with_the_code_of_its_outcome(tmp_path, argv, code, says):
    """The command skips the interpreter's teardown once its exit handlers ran: the exit code
    and everything printed must survive that, argparse's own exits included."""
    res = subprocess.run(
        [sys.executable, "-m", "pisa.cli", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == code, res.stderr[-2000:]
    assert says in res.stdout + res.stderr


def test_the_pisa_command_imports_ray_only_when_a_command_needs_it():
    """Ray registers its shutdown as an exit handler when it is imported: after `pisa.cli`'s
    own (which ends the process) it runs before it. Importing the CLI stays light too."""
    probe = "import sys, pisa.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'mlflow'}))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_pisa_train_with_corrupt_annotations_is_one_line_exit_2_and_leaves_no_run(synthetic_dir, tmp_path, capsys):
    """`pisa train` parses the annotations while Ray starts: a bad file still ends it with its
    one-line error before any MLflow run or Ray Train directory exists, and a Ray it started
    is stopped again."""
    import ray

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    data = tiny_experiment(synthetic_dir, tmp_path)
    data["data"]["val_annotations"] = str(broken)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(data))
    ray_was_running = ray.is_initialized()
    code, err = _run(capsys, "train", str(config))
    assert code == 2 and err.splitlines()[-1].startswith(f"error: {broken}:1:13: malformed JSON"), err[-2000:]
    assert ray.is_initialized() == ray_was_running
    assert not (tmp_path / "ray_results").exists()
    if (tmp_path / "mlflow.db").exists():  # set up beside Ray: no run in it
        assert tracking.tracker(f"sqlite:///{tmp_path / 'mlflow.db'}").find_runs("tests", "") == []


@pytest.mark.slow
def test_a_failed_tune_trial_is_explained_by_its_pisa_error(ray_local, tmp_path):
    """The study's MLflow callback reads a failed trial's error as Tune pickled it."""
    from ray import tune

    from pisa.trials.fit import trial_error

    messages: list[str] = []

    def fails_in_a_worker(config):  # defined here: Ray ships it by value, not by module name
        raise WorkerGroupError("rank 0 failed", {0: NonFiniteLossError("non-finite loss at epoch 1 iteration 2")})

    class Grab(tune.Callback):
        def on_trial_error(self, iteration, trials, trial, **info):
            messages.append(trial_error(trial))

    trainable = tune.with_resources(fails_in_a_worker, {"CPU": 0.01})
    tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[Grab()], verbose=0)).fit()
    assert messages == ["NonFiniteLossError: non-finite loss at epoch 1 iteration 2"]


def _fails_with(errors: dict[int, BaseException], mark: str) -> None:
    """A seeded point whose seeds failed with `errors`, inside the retry guard."""
    from pisa.trials.fit import failing_at_once_on_retry
    from pisa.trials.seeds import _raise_first

    with failing_at_once_on_retry(mark):
        _raise_first(errors)


def test_a_deterministic_failure_makes_the_retry_fail_at_once_with_it(tmp_path):
    from pisa.trials.fit import failing_at_once_on_retry
    from pisa.trials.seeds import SeedFailed

    mark = str(tmp_path / "failed.json")
    nan = NonFiniteLossError("non-finite loss at epoch 2 iteration 5: total=nan")
    with pytest.raises(SeedFailed) as failed:
        _fails_with({2: RuntimeError("collateral"), 1: nan}, mark)
    assert str(failed.value) == "seed 1: NonFiniteLossError: non-finite loss at epoch 2 iteration 5: total=nan"
    assert find_pisa_error(failed.value) is nan  # decides the exit code and the retry
    ran = []
    with pytest.raises(NonFiniteLossError, match="^non-finite loss at epoch 2 iteration 5: total=nan$"):
        with failing_at_once_on_retry(mark):
            ran.append(True)  # the retry's training
    assert ran == []

    # an error that could pass on a retry (a lost node, a timeout) leaves no mark
    other = str(tmp_path / "other.json")
    with pytest.raises(SeedFailed) as lost:
        _fails_with({0: RuntimeError("node lost")}, other)
    assert find_pisa_error(lost.value) is lost.value and lost.value.exit_code == 1  # no pisa error inside
    with failing_at_once_on_retry(other):
        ran.append(True)
    assert ran == [True]


def test_a_retry_mark_of_an_earlier_version_fails_the_retry_with_its_text(tmp_path):
    from pisa.trials.fit import failing_at_once_on_retry

    mark = tmp_path / "failed"
    mark.write_text("NonFiniteLossError: non-finite loss at epoch 1 iteration 2")
    with pytest.raises(RuntimeError, match="^NonFiniteLossError: non-finite loss at epoch 1 iteration 2$"):
        with failing_at_once_on_retry(str(mark)):
            pytest.fail("the retry trained")


def test_a_gpu_config_on_a_cluster_without_gpus_is_one_line_exit_2_and_leaves_no_run(
    ray_local, synthetic_dir, tmp_path, capsys
):
    """The paper's 8-GPU config on this CPU-only cluster: what it needs against what the
    cluster has, with the flags that fit, instead of Ray waiting forever."""
    config = REPO / "configs" / "faster_rcnn_r50_fpn_1x_pisa.yaml"
    data = {
        "data.train_images": synthetic_dir / "train",
        "data.train_annotations": synthetic_dir / "train.json",
        "data.val_images": synthetic_dir / "val",
        "data.val_annotations": synthetic_dir / "val.json",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment": "tests",
        "storage_path": tmp_path / "ray_results",
    }
    sets = [x for k, v in data.items() for x in ("--set", f"{k}={v}")]
    code, err = _run(capsys, "train", str(config), *sets)
    last = err.strip().splitlines()[-1]
    assert code == 2, err[-2000:]
    assert last.startswith(f"error: {config}: the training needs 8 worker(s) x 1 CPU, 1 GPU = 8 CPU, 8 GPU"), last
    assert "the Ray cluster has 2 CPU, 0 GPU" in last and "--cpu" in last and "--workers" in last
    assert not (tmp_path / "ray_results").exists()
    if (tmp_path / "mlflow.db").exists():
        assert tracking.tracker(f"sqlite:///{tmp_path / 'mlflow.db'}").find_runs("tests", "") == []
