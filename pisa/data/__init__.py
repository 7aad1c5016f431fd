"""Datasets for detection: validated COCO loading, v2 transforms, a synthetic shapes set; imports core only.

`build_dataset` is the one entry point training and evaluation use, so every Ray worker
builds its data the same way from a `DataConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pisa.data.coco import (
    BOX_TOLERANCE,
    CocoDetection,
    DataError,
    load_coco_json,
    require_annotation_file,
    require_image_dir,
)
from pisa.data.synthetic import CLASSES, ensure_synthetic, generate_synthetic, synth_command
from pisa.data.transforms import DetectionTransform, build_transforms, collate_fn

if TYPE_CHECKING:
    from pisa.core.config import DataConfig

__all__ = [
    "BOX_TOLERANCE",
    "CLASSES",
    "CocoDetection",
    "DataError",
    "DetectionTransform",
    "build_dataset",
    "build_transforms",
    "check_data_files",
    "collate_fn",
    "ensure_synthetic",
    "generate_synthetic",
    "load_coco_json",
    "synth_command",
]


def check_data_files(cfg: DataConfig) -> None:
    """The annotation files and image directories exist: the instant part of the data check,
    made before anything starts (parsing the annotations can take a while on a large set)."""
    if cfg.synthetic is not None:
        return  # generated when missing
    for split in ("train", "val"):
        annotations = Path(getattr(cfg, f"{split}_annotations"))
        require_annotation_file(annotations)
        require_image_dir(annotations, Path(getattr(cfg, f"{split}_images")))


def build_dataset(
    cfg: DataConfig,
    split: Literal["train", "val"],
    train: bool,
    with_masks: bool = False,
    max_size: int | None = None,
    fixed_size: int | None = None,
) -> CocoDetection:
    """The `split` of a `DataConfig` as a dataset; generates the synthetic set first if needed.

    `train` switches on the `cfg.augment` preset (random flipping with `cfg.flip_prob`, and
    SSD's photometric distortion, zoom-out and crop for `ssd`); `cfg.train_limit`/`cfg.val_limit`
    keep the first N images (sorted by image id) of the split; the train split leaves images
    without annotations out with `cfg.skip_empty_train`. `fixed_size` is the square input
    of a fixed-size detector (`pisa.models.fixed_input_size`): images leave the loader at it.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.synthetic is not None:
        ensure_synthetic(cfg.synthetic)
    images: Path = getattr(cfg, f"{split}_images")
    annotations: Path = getattr(cfg, f"{split}_annotations")
    limit = cfg.train_limit if split == "train" else cfg.val_limit
    return CocoDetection(
        images,
        annotations,
        transforms=build_transforms(
            train, flip_prob=cfg.flip_prob, max_size=max_size, augment=cfg.augment, fixed_size=fixed_size
        ),
        with_masks=with_masks,
        bad_boxes=cfg.bad_boxes,
        limit=limit,
        skip_empty=split == "train" and cfg.skip_empty_train,
    )
