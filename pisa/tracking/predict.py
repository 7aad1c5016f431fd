"""A trained detector, ready to run on image files: load it, predict, write the results.

A model reference is a `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) URI, an MLflow
run id (its registered pyfunc model if it has one, else its `checkpoint/` artifact), or
a checkpoint file/directory on disk (`checkpoint.pt` + `config.json`, as training
writes them: `pisa.core.checkpoint`). Only weights are loaded, with
`torch.load(weights_only=True)`; the class names come from the checkpoint (from the
training annotations for one written before checkpoints carried them).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import TrackingConfig
from ..core.uris import redact
from .detector import Detections, Detector, PredictInputError, load_checkpoint_dir, read_image
from .store import tracker

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# ---------------------------------------------------------------- loading one


def load_detector(ref: str, tracking_uri: str | None = None) -> Detector:
    """A `models:/` URI, a run id or a checkpoint path -> a `Detector`."""
    if ref.startswith("models:/") or ref.startswith("runs:/"):
        return _load_pyfunc(ref, tracking_uri)
    path = Path(ref)
    if path.exists():
        return load_checkpoint_dir(path)
    if RUN_ID.match(ref):
        return _load_run(ref, tracking_uri)
    raise PredictInputError(f"model {ref!r}: not a models:/ URI, an MLflow run id or an existing checkpoint")


def _resolved_uri(tracking_uri: str | None, ref: str) -> str:
    """The store to look `ref` up in; a SQLite file that isn't there is an error, not a new store."""
    uri = tracking_uri or TrackingConfig().resolved_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise PredictInputError(
            f"model {ref!r}: no MLflow store at {uri[len('sqlite:///') :]} (give --tracking-uri or MLFLOW_TRACKING_URI)"
        )
    return uri


def _load_pyfunc(ref: str, tracking_uri: str | None) -> Detector:
    from .registry import load_pyfunc  # mlflow's pyfunc: only for a logged or registered model

    try:
        model = load_pyfunc(ref, _resolved_uri(tracking_uri, ref))
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PredictInputError(f"model {ref!r}: {message}") from None
    return model.unwrap_python_model().detector


def _load_run(run_id: str, tracking_uri: str | None) -> Detector:
    from .registry import logged_model_uri  # mlflow's pyfunc: only for a run id

    uri = _resolved_uri(tracking_uri, run_id)
    try:
        tracker(uri).run(run_id)
    except Exception:
        raise PredictInputError(f"model {run_id!r}: no such MLflow run in {redact(uri)}") from None
    model_uri = logged_model_uri(uri, run_id)
    if model_uri is not None:
        return _load_pyfunc(model_uri, uri)
    with tempfile.TemporaryDirectory(prefix="pisa-model-") as tmp:
        try:
            local = tracker(uri).download_artifact(run_id, "checkpoint", tmp)
        except Exception:
            raise PredictInputError(f"run {run_id}: has neither a logged model nor a checkpoint/ artifact") from None
        return load_checkpoint_dir(local)


# ---------------------------------------------------------------- images in, results out


def image_ids(paths: list[Path], annotations: str | Path | None = None) -> list[int]:
    """COCO image ids for the files: from an annotation file's `file_name`s when given,
    else a numeric file stem, else the position (1..N)."""
    by_name: dict[str, int] = {}
    if annotations is not None:
        try:
            data = json.loads(Path(annotations).read_text())
        except (OSError, ValueError) as exc:
            raise PredictInputError(f"{annotations}: cannot read ({exc})") from None
        by_name = {Path(i["file_name"]).name: int(i["id"]) for i in data.get("images", [])}
    ids = []
    for n, p in enumerate(paths, start=1):
        if by_name:
            if p.name not in by_name:
                raise PredictInputError(f"{p}: not among the images of {annotations}")
            ids.append(by_name[p.name])
        else:
            ids.append(int(p.stem) if p.stem.isdigit() else n)
    return ids


def coco_results(detector: Detector, ids: list[int], detections: list[Detections]) -> list[dict[str, Any]]:
    """COCO results format: one dict per box, bbox as [x, y, w, h]."""
    out = []
    for image_id, det in zip(ids, detections):
        for box, label, score in zip(det.boxes.tolist(), det.labels.tolist(), det.scores.tolist()):
            x1, y1, x2, y2 = box
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": detector.category_id(int(label)),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(score), 5),
                }
            )
    return out


def _label_font() -> str | None:
    """A TrueType font for readable labels: matplotlib (a dependency) ships DejaVu Sans;
    without one torchvision falls back to a tiny bitmap font."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except (ImportError, ValueError):
        return None


def draw(detector: Detector, image: torch.Tensor, det: Detections, out: Path) -> Path:
    """The image with its boxes, class names and scores drawn, as a PNG."""
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes

    pixels = (image * 255).round().to(torch.uint8)
    labels = [f"{detector.name_of(int(label))} {float(score):.2f}" for label, score in zip(det.labels, det.scores)]
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    colors = [palette[(int(label) - 1) % len(palette)] for label in det.labels]
    width = max(1, round(max(image.shape[-2:]) / 300))
    drawn = draw_bounding_boxes(
        pixels,
        det.boxes,
        labels=labels,
        colors=colors or None,
        width=width,
        font=_label_font(),
        font_size=max(12, width * 7),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(drawn, str(out))
    return out


@dataclass
class PredictionRun:
    results: list[dict[str, Any]]
    drawn: list[Path]
    num_images: int


def predict_files(
    model: str,
    images: list[str],
    *,
    out: str | None = None,
    draw_dir: str | None = None,
    score_thr: float = 0.05,
    annotations: str | None = None,
    tracking_uri: str | None = None,
) -> PredictionRun:
    """`pisa predict`: every input is checked before the model runs."""
    if not 0.0 <= score_thr <= 1.0:
        raise PredictInputError(f"--score-thr {score_thr}: must be in [0, 1]")
    paths = [Path(p) for p in images]
    tensors = [read_image(p) for p in paths]
    ids = image_ids(paths, annotations)
    detector = load_detector(model, tracking_uri)
    detections = detector.predict(tensors, score_thr=score_thr)
    results = coco_results(detector, ids, detections)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results))
    drawn = []
    if draw_dir:
        for p, image, det in zip(paths, tensors, detections):
            drawn.append(draw(detector, image, det, Path(draw_dir) / f"{p.stem}.png"))
    return PredictionRun(results, drawn, len(paths))
