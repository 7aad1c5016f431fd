"""A trained detector from its training's files: the weights (tensors only,
`torch.load(weights_only=True)`), the training config saved beside them and the class names
of its annotations; and image files read the way it takes them (float CHW RGB in [0, 1])."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.config import ExperimentConfig, parse_config
from ..core.errors import EXIT_BAD_INPUT, PisaError
from ..core.storage import CHECKPOINT_FILE
from ..models import build_detector as build_model


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
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PredictInputError(f"{path}: cannot read the training config ({exc})") from None
    return parse_config(data, source=str(path))


def build_detector(cfg: ExperimentConfig, categories: list[Category], weights: dict[str, torch.Tensor]) -> Detector:
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
