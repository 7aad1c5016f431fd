"""A trained detector from its training's checkpoint (`pisa.core.checkpoint`): the weights
(tensors only, `torch.load(weights_only=True)`), the training config saved beside them and the
class names the checkpoint carries (or, in one of an earlier version, those of the training
annotations); and image files read the way it takes them (float CHW RGB in [0, 1])."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import checkpoint
from ..core.checkpoint import CONFIG_FILE, Checkpoint, checkpoint_file, is_checkpoint_state
from ..core.config import ExperimentConfig
from ..core.errors import EXIT_BAD_INPUT, ConfigError, PisaError
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


def categories_in(ckpt: Checkpoint) -> list[Category] | None:
    """The classes a checkpoint carries, in label order; None for one of an earlier version."""
    if ckpt.class_names is None:
        return None
    ids = ckpt.category_ids
    if ids is None or len(ids) != len(ckpt.class_names):
        ids = list(range(1, len(ckpt.class_names) + 1))
    return [Category(int(i), str(name)) for i, name in zip(ids, ckpt.class_names)]


def read_config(path: str | Path) -> ExperimentConfig:
    """The training config saved beside a checkpoint (`config.json`)."""
    try:
        return checkpoint.read_config(path)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise PredictInputError(f"{path}: cannot read the training config ({exc})") from None


def build_detector(cfg: ExperimentConfig, categories: list[Category], weights: dict[str, torch.Tensor]) -> Detector:
    model = build_model(cfg.model, num_classes=len(categories))
    model.load_state_dict(weights)
    model.eval()
    return Detector(model, categories, cfg)


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], Checkpoint | None]:
    """The model's state dict in a training checkpoint or a weights file (tensors only), and
    the checkpoint (None for a weights file)."""
    try:
        state = checkpoint.read_state(path)
    except Exception as exc:
        raise PredictInputError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from None
    ckpt = Checkpoint.from_state(state) if is_checkpoint_state(state) else None
    weights = ckpt.model if ckpt is not None else state
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise PredictInputError(f"{path}: holds no model weights")
    return weights, ckpt


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a training checkpoint or a weights file (tensors only)."""
    return _read(path)[0]


def load_checkpoint_dir(path: str | Path) -> Detector:
    """A detector from a checkpoint directory (or its `checkpoint.pt`) with its `config.json`;
    the classes from the checkpoint, or for one of an earlier version (which carries none)
    from the training annotations the config names, at their path."""
    ckpt_file = checkpoint_file(path)
    config_file = ckpt_file.parent / CONFIG_FILE
    if not ckpt_file.exists():
        raise PredictInputError(f"{ckpt_file}: no such checkpoint")
    if not config_file.exists():
        raise PredictInputError(f"{ckpt_file}: no {CONFIG_FILE} beside it (the training config of these weights)")
    cfg = read_config(config_file)
    weights, ckpt = _read(ckpt_file)
    categories = categories_in(ckpt) if ckpt is not None else None
    if categories is None:
        assert cfg.data.train_annotations is not None  # the config's validation fills or refuses it
        categories = categories_of(cfg.data.train_annotations)
    return build_detector(cfg, categories, weights)


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
