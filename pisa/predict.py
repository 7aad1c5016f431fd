"""A trained detector, ready to run on image files: load it, predict, write the results.

A model reference is a `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) URI, an MLflow
run id (its registered pyfunc model if it has one, else its `checkpoint/` artifact), or
a checkpoint file/directory on disk (`checkpoint.pt` + `config.json`, as training
writes them). Only weights are loaded, with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import EXIT_BAD_INPUT, PisaError

if TYPE_CHECKING:
    from .config import ExperimentConfig

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class PredictInputError(PisaError, ValueError):
    """A model reference or image that can't be used; one line, naming what is wrong."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class Category:
    id: int  # the COCO category id
    name: str


@dataclass
class Detections:
    """One image's detections: boxes xyxy in the image's pixels, model labels 1..C."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


@dataclass
class Detector:
    """A detector in eval mode with the classes its labels 1..C stand for."""

    model: nn.Module
    categories: list[Category]
    config: ExperimentConfig  # the training config of the weights

    def name_of(self, label: int) -> str:
        return self.categories[label - 1].name if 0 < label <= len(self.categories) else str(label)

    def category_id(self, label: int) -> int:
        return self.categories[label - 1].id if 0 < label <= len(self.categories) else int(label)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], score_thr: float = 0.0, batch_size: int = 4) -> list[Detections]:
        """Float CHW images in [0, 1] -> their detections with score >= `score_thr`."""
        out: list[Detections] = []
        for start in range(0, len(images), batch_size):
            for raw in self.model(images[start : start + batch_size]):
                keep = raw["scores"] >= score_thr
                out.append(Detections(raw["boxes"][keep].cpu(), raw["labels"][keep].cpu(), raw["scores"][keep].cpu()))
        return out


# ---------------------------------------------------------------- building one


def categories_of(annotation_file: str | Path) -> list[Category]:
    """The classes of a COCO file in the order the dataset gives them labels (by id)."""
    path = Path(annotation_file)
    try:
        cats = json.loads(path.read_text()).get("categories", [])
    except (OSError, ValueError) as exc:
        raise PredictInputError(f"{path}: cannot read the class names ({exc})") from None
    return [Category(int(c["id"]), str(c["name"])) for c in sorted(cats, key=lambda c: int(c["id"]))]


def read_config(path: str | Path) -> ExperimentConfig:
    """The training config saved beside a checkpoint (`config.json`)."""
    from .config import parse_config

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PredictInputError(f"{path}: cannot read the training config ({exc})") from None
    return parse_config(data, source=str(path))


def build_detector(cfg: ExperimentConfig, categories: list[Category], weights: dict[str, torch.Tensor]) -> Detector:
    from .models import build_detector as build_model

    model = build_model(cfg.model, num_classes=len(categories))
    model.load_state_dict(weights)
    model.eval()
    return Detector(model, categories, cfg)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a training checkpoint or a weights file (tensors only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PredictInputError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PredictInputError(f"{path}: holds no model weights")
    return state


def load_checkpoint_dir(path: str | Path) -> Detector:
    """A detector from a checkpoint directory (or its `checkpoint.pt`) with its `config.json`."""
    from .engine import CHECKPOINT_FILE

    path = Path(path)
    ckpt = path / CHECKPOINT_FILE if path.is_dir() else path
    config_file = ckpt.parent / "config.json"
    if not ckpt.exists():
        raise PredictInputError(f"{ckpt}: no such checkpoint")
    if not config_file.exists():
        raise PredictInputError(f"{ckpt}: no config.json beside it (the training config of these weights)")
    cfg = read_config(config_file)
    assert cfg.data.train_annotations is not None  # the config's validation fills or refuses it
    return build_detector(cfg, categories_of(cfg.data.train_annotations), load_weights(ckpt))


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
    from .config import TrackingConfig

    uri = tracking_uri or TrackingConfig().resolved_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise PredictInputError(
            f"model {ref!r}: no MLflow store at {uri[len('sqlite:///') :]} (give --tracking-uri or MLFLOW_TRACKING_URI)"
        )
    return uri


def _load_pyfunc(ref: str, tracking_uri: str | None) -> Detector:
    from .registry import load_pyfunc

    try:
        model = load_pyfunc(ref, _resolved_uri(tracking_uri, ref))
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PredictInputError(f"model {ref!r}: {message}") from None
    return model.unwrap_python_model().detector


def _load_run(run_id: str, tracking_uri: str | None) -> Detector:
    from . import tracking
    from .registry import logged_model_uri

    uri = _resolved_uri(tracking_uri, run_id)
    try:
        tracking.client(uri).get_run(run_id)
    except Exception:
        raise PredictInputError(f"model {run_id!r}: no such MLflow run in {tracking.redact(uri)}") from None
    model_uri = logged_model_uri(uri, run_id)
    if model_uri is not None:
        return _load_pyfunc(model_uri, uri)
    with tempfile.TemporaryDirectory(prefix="pisa-model-") as tmp:
        try:
            local = tracking.client(uri).download_artifacts(run_id, "checkpoint", tmp)
        except Exception:
            raise PredictInputError(f"run {run_id}: has neither a logged model nor a checkpoint/ artifact") from None
        return load_checkpoint_dir(local)


# ---------------------------------------------------------------- images in, results out


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as float CHW RGB in [0, 1]."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    path = Path(path)
    if not path.is_file():
        raise PredictInputError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise PredictInputError(f"{path}: not a readable image ({type(exc).__name__})") from None
    return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)


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
