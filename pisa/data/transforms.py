"""Detection transforms on torchvision.transforms.v2 tv_tensors, plus the batch collate.

Boxes and masks travel as `tv_tensors` so flips and resizes move them with the image.
Images leave as uint8 CHW: a quarter of float32's bytes to pin and copy to the device, where
the detector's transform (`pisa.models.fixed_size.PisaTransform`) scales them to [0, 1] and
normalizes them. The final resize is the detector's too, except for a fixed-size input
(`fixed_size`, SSD): that one is done here, so the zoom-out canvas (up to 16x the image's area)
never travels. The optional `max_size` cap only saves decode/collate time on large images.

Augmentation presets (`data.augment`): `flip` (horizontal flip only, the two-stage and RetinaNet
set-ups) and `ssd`, SSD's data set-up as mmdetection's SSD configs run it (`pisa.data.ssd_augment`):
photometric distortion, zoom-out onto a mean-coloured canvas (1-4x), a random crop with a
minimum IoU to every box, the fixed-size resize, then flip; boxes the crop removes are dropped
with their labels.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pisa.data.ssd_augment import draw_ssd, ssd_augment

__all__ = ["AUGMENT_PRESETS", "DetectionTransform", "build_transforms", "collate_fn"]

AUGMENT_PRESETS = ("flip", "ssd")
_PER_BOX = ("labels", "area", "iscrowd")


def _ssd(img: torch.Tensor, target: dict[str, Any], size: int | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """SSD's augmentation (`pisa.data.ssd_augment`), ending at `size` when given; the per-box
    fields follow the boxes the crop keeps, `area` is the box's."""
    if "masks" in target:
        raise ValueError("data.augment 'ssd' does not transform masks (SSD trains on boxes)")
    boxes = target["boxes"].as_subclass(torch.Tensor)
    draws = draw_ssd(img.shape[-2], img.shape[-1], boxes)
    img, boxes, keep = ssd_augment(img.as_subclass(torch.Tensor), boxes, draws, size)
    for key in _PER_BOX:
        if key in target:
            target[key] = target[key][keep]
    target["boxes"] = tv_tensors.BoundingBoxes(
        boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(img.shape[-2], img.shape[-1])
    )
    if "area" in target:  # the boxes were cropped and rescaled: their area is the box's
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return tv_tensors.Image(img), target


def _to_image(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """`F.to_image`, for an RGB PIL image with one copy of its bytes fewer (the same tensor)."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return tv_tensors.Image(data.view(image.height, image.width, 3).permute(2, 0, 1))
    return F.to_image(image)


def _resize(
    img: torch.Tensor, target: dict[str, Any], size: list[int], antialias: bool
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`img` resized to `size` (H, W), bilinear; boxes, masks and `area` scaled along."""
    height, width = img.shape[-2:]
    if [height, width] == size:
        return img, target
    img, target = v2.Resize(size, antialias=antialias)(img, target)
    if "area" in target:
        target["area"] = target["area"] * ((size[1] / width) * (size[0] / height))
    return img, target


class DetectionTransform:
    """`(PIL image, target) -> (uint8 CHW image, target)` with optional cap, flip and fixed size.

    `max_size` shrinks images whose longer side exceeds it (never enlarges); `fixed_size` resizes
    every image to that square side (the input of a fixed-size detector, after augmentation).
    Boxes, masks and `area` are scaled along, `orig_size` keeps the file's size so predictions
    can be mapped back.
    """

    def __init__(
        self, flip_prob: float = 0.0, max_size: int | None = None, augment: str = "flip", fixed_size: int | None = None
    ) -> None:
        if augment not in AUGMENT_PRESETS:
            raise ValueError(f"augment must be one of {AUGMENT_PRESETS}, got {augment!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if fixed_size is not None and fixed_size < 1:
            raise ValueError(f"fixed_size must be >= 1, got {fixed_size}")
        self.fixed_size = fixed_size
        self.flip_prob = flip_prob
        self.max_size = max_size
        self.flip = v2.RandomHorizontalFlip(p=flip_prob)
        self.augment = augment

    def __repr__(self) -> str:
        return (
            f"DetectionTransform(flip_prob={self.flip_prob}, max_size={self.max_size}, "
            f"augment={self.augment!r}, fixed_size={self.fixed_size})"
        )

    def __call__(
        self, image: Image.Image | torch.Tensor, target: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        img = _to_image(image)
        height, width = img.shape[-2:]
        target = dict(target)
        target["boxes"] = tv_tensors.BoundingBoxes(
            target["boxes"], format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
        )
        if "masks" in target:
            target["masks"] = tv_tensors.Mask(target["masks"])

        if self.max_size is not None and max(height, width) > self.max_size:
            scale = self.max_size / max(height, width)
            new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
            img, target = _resize(img, target, new_size, antialias=True)

        if self.augment == "ssd":  # its last step is the resize to `fixed_size`
            img, target = _ssd(img, target, self.fixed_size)

        if self.fixed_size is not None:  # no antialiasing: as the detector's resize on the device did
            img, target = _resize(img, target, [self.fixed_size, self.fixed_size], antialias=False)

        if self.flip_prob > 0:
            img, target = self.flip(img, target)

        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
        return img.as_subclass(torch.Tensor), target


def build_transforms(
    train: bool,
    flip_prob: float = 0.5,
    max_size: int | None = None,
    augment: str = "flip",
    fixed_size: int | None = None,
) -> DetectionTransform:
    """Training: the `augment` preset (random horizontal flip with `flip_prob`, plus SSD's
    photometric distortion, zoom-out and crop for `ssd`); evaluation: no randomness. Both end
    at `fixed_size` when the detector takes one (SSD)."""
    if train:
        return DetectionTransform(flip_prob=flip_prob, max_size=max_size, augment=augment, fixed_size=fixed_size)
    return DetectionTransform(flip_prob=0.0, max_size=max_size, fixed_size=fixed_size)


def collate_fn(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep variable image sizes: detectors take a list of images and a list of targets."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets
