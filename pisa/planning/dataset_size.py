"""How many images a study's epoch trains on (and evaluates), known without the images: from
the annotation files alone, else from the sizes of the standard sets the shipped configs name,
else from `pisa study plan --images N`. The plan never opens an image file: a laptop without
COCO plans a COCO study; `pisa study run` checks the data itself (`training.train`).

The training set counts as the training loads it (`pisa.data.CocoDetection`): with
`data.skip_empty_train` (the default, mmdetection's `filter_empty_gt`) the images with at least
one annotation (crowd ones count), then the first `data.train_limit`. Validation keeps every
image, then the first `data.val_limit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.config import DataConfig
from ..core.errors import ConfigError


@dataclass(frozen=True)
class KnownSet:
    """A standard annotation file's counts, for a plan on a machine without it."""

    name: str
    images: int
    annotated: int  # images with at least one annotation (what skip_empty_train keeps)


# by the annotation file's name, as the shipped configs (configs/*.yaml) give it
KNOWN_SETS = {
    "instances_train2017.json": KnownSet("COCO 2017 train", 118_287, 117_266),
    "instances_val2017.json": KnownSet("COCO 2017 val", 5_000, 4_952),
}


@dataclass(frozen=True)
class SetSize:
    """One split's image count as the epoch sees it, and where the count came from."""

    images: int
    source: str  # "117266 annotated images of COCO 2017 train (...)", "--images 5000"


def training_set_size(data: DataConfig, images: int | None = None) -> SetSize:
    """The images one epoch trains on: `images` (`--images N`, the training set before
    `data.train_limit`) when given, else counted from the train annotation file, else the
    known size of a standard set; a `ConfigError` naming `--images` when none of these is there."""
    limit = data.train_limit
    if images is not None:
        return _limited(SetSize(images, f"--images {images}"), limit)
    counted = _from_annotations(data, "train")
    if counted is None:
        raise ConfigError(
            f"{data.train_annotations}: annotation file not found, and not a standard set whose size "
            f"pisa knows ({', '.join(KNOWN_SETS)}): give the training set's size with --images N"
        )
    return _limited(counted, limit)


def val_set_size(data: DataConfig) -> SetSize | None:
    """The images one evaluation runs over; None when neither the file nor a known set says."""
    counted = _from_annotations(data, "val")
    return None if counted is None else _limited(counted, data.val_limit)


def _limited(size: SetSize, limit: int | None) -> SetSize:
    if limit is None or limit >= size.images:
        return size
    return SetSize(limit, f"the first {limit} (data.train_limit/val_limit) of {size.images}: {size.source}")


def _from_annotations(data: DataConfig, split: str) -> SetSize | None:
    """The split's count from its annotation file (validated as the training reads it, the
    images not opened), else from `KNOWN_SETS`; None when neither."""
    path = Path(getattr(data, f"{split}_annotations"))
    skip_empty = split == "train" and data.skip_empty_train
    if data.synthetic is not None and not path.is_file():
        count = data.synthetic.train if split == "train" else data.synthetic.val
        return SetSize(count, f"the synthetic set's {split}: {count} (generated when the study runs)")
    if path.is_file():
        from ..data import load_coco_json  # pycocotools; no image is opened

        coco = load_coco_json(path, None, bad_boxes=data.bad_boxes)
        total = len(coco.imgs)
        if not skip_empty:
            return SetSize(total, f"{total} images in {path.name}")
        annotated = len({ann["image_id"] for ann in coco.anns.values()})
        return SetSize(
            annotated, f"{annotated} of {total} images in {path.name}: those with annotations (data.skip_empty_train)"
        )
    known = KNOWN_SETS.get(path.name)
    if known is None:
        return None
    if skip_empty:
        return SetSize(
            known.annotated,
            f"{known.annotated} of {known.images} images of {known.name}: those with annotations "
            f"(data.skip_empty_train); {_shown(path)} is not here, its known size",
        )
    return SetSize(known.images, f"{known.images} images of {known.name}; {_shown(path)} is not here, its known size")


def _shown(path: Path) -> str:
    """The path relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
