"""Bad input to `pisa data synth` and `pisa train --resume`: one line naming what is wrong,
exit 2, nothing written and no Ray started (the checkpoint is checked by the driver, where
the user's relative path means what they meant, and never retried)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import tiny_experiment

from pisa.cli import main
from pisa.core.checkpoint import Checkpoint, check_checkpoint, write_checkpoint


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--train", "0", "--train 0: must be at least 1"),
        ("--train", "-3", "--train -3: must be at least 1"),
        ("--val", "0", "--val 0: must be at least 1"),
        ("--image-size", "0", "--image-size 0: must be at least 32"),
        ("--image-size", "31", "--image-size 31: must be at least 32"),
    ],
)
def test_data_synth_refuses_sizes_it_cannot_make(tmp_path, capsys, option, value, says):
    out = tmp_path / "shapes"
    code, err = _run(capsys, "data", "synth", "--out", str(out), option, value)
    assert code == 2 and err == f"error: {says}", err
    assert not out.exists()


def test_data_synth_makes_the_smallest_set_it_accepts(tmp_path, capsys):
    out = tmp_path / "shapes"
    code = main(["data", "synth", "--out", str(out), "--train", "1", "--val", "1", "--image-size", "32"])
    assert code == 0
    assert len(list((out / "train").iterdir())) == 1 and len(list((out / "val").iterdir())) == 1


def _checkpoint(directory: Path) -> Path:
    import torch

    directory.mkdir(parents=True)
    state = {"w": torch.arange(20000, dtype=torch.float32)}  # big enough that a third of it is cut mid-tensor
    write_checkpoint(directory, Checkpoint(model=state, optimizer={}, scheduler={}, scaler={}, epoch=0, iteration=4))
    return directory


@pytest.fixture
def train_config(tmp_path, synthetic_dir) -> Path:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_experiment(synthetic_dir, tmp_path)))
    return config


def _nothing_started(work: Path) -> bool:
    """No Ray Train directory and no tracking store: the check came before both."""
    return not (work / "ray_results").exists() and not (work / "mlflow.db").exists()


def test_train_resume_from_a_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys, monkeypatch, no_ray, train_config):
    user_dir = tmp_path / "elsewhere"
    user_dir.mkdir()
    monkeypatch.chdir(user_dir)
    code, err = _run(capsys, "train", str(train_config), "--cpu", "--resume", "ckpt/checkpoint_000000")
    # relative to the user's directory, and the file inside the checkpoint directory named
    assert code == 2 and err == f"error: --resume {user_dir / 'ckpt' / 'checkpoint_000000'}: no such file", err
    assert _nothing_started(tmp_path)


def test_train_resume_from_a_cut_checkpoint_is_one_line_exit_2(tmp_path, capsys, monkeypatch, no_ray, train_config):
    ckpt = _checkpoint(tmp_path / "ckpt" / "checkpoint_000000")
    data = (ckpt / "checkpoint.pt").read_bytes()
    (ckpt / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # a full disk, an interrupted copy
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, "train", str(train_config), "--cpu", "--resume", "ckpt/checkpoint_000000")
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"error: --resume {ckpt / 'checkpoint.pt'}: not a readable training checkpoint ("), err
    assert _nothing_started(tmp_path)


@pytest.mark.parametrize(
    "content, says",
    [(b"", "an empty file, not a training checkpoint"), (None, "not a training checkpoint (no model state)")],
)
def test_a_checkpoint_that_is_empty_or_holds_no_model_is_refused(tmp_path, content, says):
    import torch

    file = tmp_path / "checkpoint.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, file)  # bare weights: no training state
    else:
        file.write_bytes(content)
    with pytest.raises(ValueError) as refused:
        check_checkpoint(file)
    assert str(refused.value) == f"--resume {file}: {says}"
    assert refused.value.exit_code == 2  # type: ignore[attr-defined]


def test_a_relative_checkpoint_path_is_the_users_directorys(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "runs" / "checkpoint_000001")
    monkeypatch.chdir(tmp_path / "runs")
    resolved = check_checkpoint("checkpoint_000001")
    assert resolved.is_absolute() and resolved == ckpt
    monkeypatch.chdir(tmp_path)  # what a Ray worker, elsewhere, is handed still reads
    assert check_checkpoint(resolved) == ckpt
