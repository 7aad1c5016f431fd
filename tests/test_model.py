"""From a trained run to a usable model: `pisa train --register`, the registered pyfunc,
`pisa predict`, and the lineage every run carries (tags, dataset inputs, system metrics)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import mlflow_client, tiny_experiment

from pisa import tracking
from pisa.cli import main

MODEL_NAME = "tiny-detector"
PISA = [sys.executable, "-m", "pisa.cli"]


@pytest.fixture(scope="module")
def trained(ray_local, synthetic_dir, tmp_path_factory):
    """One epoch on 1 worker with `pisa train --register`; returns (uri, run id, work dir)."""
    work = tmp_path_factory.mktemp("model")
    exp = tiny_experiment(synthetic_dir, work, epochs=1, workers=1)
    exp["model"]["score_thresh"] = 0.001  # a 1-epoch model scores low: keep its boxes
    exp["tracking"]["system_metrics_interval_s"] = 1
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(exp))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["train", str(config), "--register", MODEL_NAME, "--run-name", "registered"])
    text = out.getvalue()
    assert rc == 0, text[-3000:]
    assert f"registered models:/{MODEL_NAME}@champion" in text, text[-3000:]
    uri = exp["tracking"]["uri"]
    runs = tracking.tracker(uri).find_runs("tests", "attributes.run_name = 'registered'")
    assert len(runs) == 1
    return uri, runs[0].info.run_id, work


def val_images(synthetic_dir: Path, n: int = 3) -> list[Path]:
    data = json.loads((synthetic_dir / "val.json").read_text())
    return [synthetic_dir / "val" / im["file_name"] for im in sorted(data["images"], key=lambda i: i["id"])[:n]]


def reference_outputs(uri: str, run_id: str, work: Path, images: list[Path]) -> list[dict]:
    """The trained weights, straight from the run's training checkpoint into a fresh model."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from pisa.core.config import parse_config
    from pisa.models import build_detector

    local = Path(mlflow_client(uri).download_artifacts(run_id, "checkpoint", str(work / "ref")))
    cfg = parse_config(json.loads((local / "config.json").read_text()))
    state = torch.load(local / "checkpoint.pt", map_location="cpu", weights_only=True)
    categories = json.loads(Path(cfg.data.train_annotations).read_text())["categories"]
    model = build_detector(cfg.model, num_classes=len(categories))
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        return model([to_tensor(Image.open(p).convert("RGB")) for p in images])


@pytest.mark.slow
def test_registered_champion_predicts_like_the_trained_weights(trained, synthetic_dir):
    import mlflow
    import pandas as pd

    uri, run_id, work = trained
    images = val_images(synthetic_dir)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    got = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    expected = reference_outputs(uri, run_id, work, images)
    assert len(got) == len(images)
    assert sum(len(e["boxes"]) for e in expected) > 0, "the reference model detects nothing: nothing compared"
    for (_, row), ref in zip(got.iterrows(), expected):
        assert torch.allclose(torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4), ref["boxes"], atol=1e-4)
        assert row["labels"] == ref["labels"].tolist()
        assert torch.allclose(torch.tensor(row["scores"], dtype=torch.float32), ref["scores"], atol=1e-5)
    names = {c["id"]: c["name"] for c in json.loads((synthetic_dir / "val.json").read_text())["categories"]}
    first = got.iloc[0]
    assert first["names"] == [names[c] for c in first["category_ids"]]


@pytest.mark.slow
def test_registered_package_holds_weights_config_and_classes_only(trained, synthetic_dir):
    uri, run_id, work = trained
    c = mlflow_client(uri)
    version = c.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.run_id == run_id
    import mlflow

    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(work / "pkg")))
    weights = torch.load(next(local.rglob("weights.pt")), map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    assert not {"optimizer", "scheduler", "model"} & set(weights)
    ckpt = torch.load(
        Path(c.download_artifacts(run_id, "checkpoint/checkpoint.pt", str(work / "ck"))),
        map_location="cpu",
        weights_only=True,
    )
    assert set(weights) == set(ckpt["model"])
    classes = json.loads(next(local.rglob("classes.json")).read_text())
    truth = json.loads((synthetic_dir / "train.json").read_text())["categories"]
    assert classes == [{"id": t["id"], "name": t["name"]} for t in sorted(truth, key=lambda t: t["id"])]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "signature" in mlmodel and "saved_input_example_info" in mlmodel
    assert json.loads(next(local.rglob("config.json")).read_text())["model"]["detector"] == "faster_rcnn"


@pytest.mark.slow
def test_predict_writes_coco_results_and_drawn_pngs(trained, synthetic_dir, tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    uri, run_id, _ = trained
    images = val_images(synthetic_dir)
    out, drawn = tmp_path / "preds.json", tmp_path / "drawn"
    cli = subprocess.run(
        PISA
        + [
            "predict",
            f"models:/{MODEL_NAME}@champion",
            *map(str, images),
            "--out",
            str(out),
            "--draw",
            str(drawn),
            "--score-thr",
            "0.001",
            "--annotations",
            str(synthetic_dir / "val.json"),
            "--tracking-uri",
            uri,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    gt = COCO(str(synthetic_dir / "val.json"))
    results = json.loads(out.read_text())
    assert results, "no detections written"
    dt = gt.loadRes(str(out))
    assert set(dt.getImgIds()) <= {im["id"] for im in gt.dataset["images"][:3]} | set(gt.getImgIds())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    for p in images:
        png = drawn / f"{p.stem}.png"
        with Image.open(png) as im, Image.open(p) as src:
            assert im.format == "PNG" and im.size == src.size


@pytest.mark.slow
def test_predict_from_run_id_and_checkpoint_match_the_registered_model(trained, synthetic_dir, tmp_path):
    from pisa.tracking.predict import predict_files

    uri, run_id, work = trained
    images = [str(p) for p in val_images(synthetic_dir, 2)]
    by_uri = predict_files(f"models:/{MODEL_NAME}@champion", images, score_thr=0.001, tracking_uri=uri).results
    by_run = predict_files(run_id, images, score_thr=0.001, tracking_uri=uri).results
    ckpt = mlflow_client(uri).download_artifacts(run_id, "checkpoint", str(tmp_path))
    by_ckpt = predict_files(ckpt, images, score_thr=0.001).results
    assert by_uri and by_uri == by_run == by_ckpt


@pytest.mark.parametrize(
    "case",
    ["missing image", "not an image", "unknown models uri", "unknown run id", "no such checkpoint", "no such store"],
)
def test_predict_bad_input_is_one_line_and_exit_2(case, synthetic_dir, tmp_path, capsys):
    image = str(val_images(synthetic_dir, 1)[0])
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    tracking.tracker(uri).experiment_id("tests")  # a store that exists, without that model or run
    capsys.readouterr()
    text_file = tmp_path / "notes.png"
    text_file.write_text("not pixels")
    args = {
        "missing image": ["models:/x@champion", str(tmp_path / "nope.png")],
        "not an image": ["models:/x@champion", str(text_file)],
        "unknown models uri": ["models:/nope@champion", image],
        "unknown run id": ["0123456789abcdef0123456789abcdef", image],
        "no such checkpoint": [str(tmp_path / "ckpt" / "checkpoint.pt"), image],
        "no such store": ["models:/x@champion", image, "--tracking-uri", f"sqlite:///{tmp_path / 'no.db'}"],
    }[case]
    rc = main(["predict", *args] + ([] if "--tracking-uri" in args else ["--tracking-uri", uri]))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    expected = {
        "missing image": "nope.png",
        "not an image": "notes.png",
        "unknown models uri": "nope",
        "unknown run id": "0123456789abcdef",
        "no such checkpoint": "model",
        "no such store": "no MLflow store",
    }[case]
    assert not (tmp_path / "no.db").exists()
    assert expected in err


@pytest.mark.slow
def test_train_run_has_lineage_tags_dataset_inputs_and_system_metrics(trained, synthetic_dir):
    import ray
    import torchvision

    uri, run_id, _ = trained
    run = mlflow_client(uri).get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.user"]
    assert tags["mlflow.source.name"]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["pisa.version.torch"] == torch.__version__
    assert tags["pisa.version.torchvision"] == torchvision.__version__
    assert tags["pisa.version.ray"] == ray.__version__
    assert tags["pisa.version.pisa"]
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    for split, limit in (("train", 8), ("val", 4)):
        d = inputs[split]
        ann = synthetic_dir / f"{split}.json"
        assert json.loads(d.source)["uri"] == str(ann.resolve())
        assert json.loads(d.profile)["num_images"] == limit
        assert json.loads(d.profile)["num_images_in_file"] == len(json.loads(ann.read_text())["images"])
        whole = hashlib.sha256(ann.read_bytes()).hexdigest()[:16]
        assert d.digest == hashlib.sha256(f"{whole}:first{limit}".encode()).hexdigest()[:16]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics
