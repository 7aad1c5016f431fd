"""A checkpoint's format (`pisa.core.checkpoint`) and a training's MLflow run
(`pisa.tracking.run_writer`), without training: fast."""

from __future__ import annotations

import json
import pickle

import torch
from helpers import mlflow_client, tiny_experiment

from pisa import tracking
from pisa.core.checkpoint import Checkpoint, checkpoint_files, read_checkpoint, write_checkpoint
from pisa.core.config import parse_config


def _tiny_checkpoint(cfg, model: torch.nn.Module, **classes) -> Checkpoint:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Checkpoint(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler={"last_epoch": 3},
        scaler={},
        epoch=1,
        iteration=4,
        config=cfg,
        metrics={"bbox_mAP": 0.25},
        **classes,
    )


def test_a_checkpoint_round_trips_with_its_classes_and_loads_tensors_only(synthetic_dir, tmp_path):
    cfg = parse_config(tiny_experiment(synthetic_dir, tmp_path))
    model = torch.nn.Linear(4, 2)
    payload = _tiny_checkpoint(cfg, model, class_names=["circle", "square"], category_ids=[3, 7])
    path = write_checkpoint(tmp_path, payload)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["checkpoint.pt", "config.json"]

    raw = torch.load(path, weights_only=True)  # what the tests and older readers do
    assert raw["epoch"] == 1 and raw["class_names"] == ["circle", "square"] and raw["category_ids"] == [3, 7]

    back = read_checkpoint(tmp_path, with_config=True)
    assert back.class_names == ["circle", "square"] and back.category_ids == [3, 7]
    assert (back.epoch, back.iteration, back.metrics) == (1, 4, {"bbox_mAP": 0.25})
    assert torch.equal(back.model["weight"], model.state_dict()["weight"])
    assert back.config is not None and back.config.model_dump() == cfg.model_dump()
    assert read_checkpoint(path).config is None  # a resume does not read the config

    # a checkpoint of an earlier version: no classes
    old = payload.state()
    del old["class_names"], old["category_ids"]
    torch.save(old, path)
    assert read_checkpoint(path).class_names is None


def test_predict_names_the_classes_a_checkpoint_carries_and_falls_back_to_the_annotations(synthetic_dir, tmp_path):
    from pisa.models import build_detector
    from pisa.tracking.detector import load_checkpoint_dir

    cfg = parse_config(tiny_experiment(synthetic_dir, tmp_path))
    model = build_detector(cfg.model, num_classes=3)
    names = ["a", "b", "c"]
    write_checkpoint(tmp_path, _tiny_checkpoint(cfg, model, class_names=names, category_ids=[11, 12, 13]))
    detector = load_checkpoint_dir(tmp_path)
    assert [(c.id, c.name) for c in detector.categories] == [(11, "a"), (12, "b"), (13, "c")]
    assert detector.name_of(2) == "b" and detector.category_id(3) == 13

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["class_names"], state["category_ids"]
    torch.save(state, tmp_path / "checkpoint.pt")
    cats = sorted(json.loads((synthetic_dir / "train.json").read_text())["categories"], key=lambda c: c["id"])
    fallback = load_checkpoint_dir(tmp_path / "checkpoint.pt")
    assert [(c.id, c.name) for c in fallback.categories] == [(c["id"], c["name"]) for c in cats]


def test_a_training_run_logs_its_config_each_epoch_once_its_checkpoint_and_its_end(synthetic_dir, tmp_path):
    from pisa.tracking.run_writer import TrainingRun
    from pisa.tracking.tags import Kind, RunStatus, Status

    cfg = parse_config(tiny_experiment(synthetic_dir, tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.tracker(uri).start_run(cfg.tracking.experiment, "parent")
    run = TrainingRun.start(
        uri,
        cfg,
        "child",
        kind=Kind.TRAIN,
        tags={"pisa.seed": "3", "pisa.status": Status.RUNNING},
        params={"data.num_classes": 3},
        parent_run_id=parent,
    )
    run.log_config(cfg)
    assert run.log_epoch({"epoch": 1, "train_loss": 2.0}, 1)
    assert not run.log_epoch({"epoch": 1, "train_loss": 9.0}, 1)  # reported again: logged once
    assert run.log_epoch({"epoch": 2, "train_loss": 1.0}, 2)
    (tmp_path / "ckpt").mkdir()
    write_checkpoint(tmp_path / "ckpt", _tiny_checkpoint(cfg, torch.nn.Linear(4, 2)))
    assert run.log_checkpoint(tmp_path / "ckpt") and not run.log_checkpoint(tmp_path)
    run.end(RunStatus.FAILED, status=Status.FAILED, error="boom")

    c = mlflow_client(uri)
    got = c.get_run(run.run_id)
    assert got.info.status == "FAILED" and got.info.run_name == "child"
    assert got.data.tags["pisa.kind"] == "train" and got.data.tags["mlflow.parentRunId"] == parent
    assert got.data.tags["pisa.status"] == "failed" and got.data.tags["pisa.error"] == "boom"
    assert got.data.params["data.num_classes"] == "3" and got.data.params["train.seed"] == "0"
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "train_loss")] == [(1, 2.0), (2, 1.0)]
    artifacts = {a.path for a in c.list_artifacts(run.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts
    assert {a.path for a in c.list_artifacts(run.run_id, "checkpoint")} == {
        "checkpoint/checkpoint.pt",
        "checkpoint/config.json",
    }

    # retried: RUNNING again, without the failed try's error; it travels (pickled) by id
    again = pickle.loads(pickle.dumps(run))
    assert (again.run_id, again.logged_epoch) == (run.run_id, 2)
    again.reopen(status_tag=True)
    got = c.get_run(run.run_id)
    assert got.info.status == "RUNNING" and got.data.tags["pisa.status"] == "running"
    assert "pisa.error" not in got.data.tags
