"""COCO-format detection dataset, validated when it is loaded.

Bad annotations are caught at construction time (not halfway through epoch 7 on worker 5),
and every error names the JSON file and the annotation or image id so it can be fixed.
Targets follow the torchvision detection format, so any torchvision detector can consume them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pisa.core.errors import DataError
from pisa.data.coco_json import BOX_TOLERANCE, load_coco_json, require_annotation_file, require_image_dir, selected_ids

__all__ = [
    "BOX_TOLERANCE",
    "CocoDetection",
    "DataError",
    "load_coco_json",
    "require_annotation_file",
    "require_image_dir",
]


class CocoDetection(Dataset):
    """Map-style COCO detection dataset (works with DistributedSampler).

    `__getitem__` returns `(image, target)`: image uint8 CHW (the detector scales it to [0, 1] on
    its device) after `transforms` (a callable `(PIL image, target) -> (tensor, target)`),
    target the torchvision format: `boxes` (N,4) float xyxy pixels, `labels` (N,) int64 in
    1..C, `image_id` (the COCO id), `area`, `iscrowd`, `orig_size` (H, W of the file) and with
    `with_masks` `masks` (N,H,W) uint8.
    Crowd and `ignore` annotations are left out of targets; COCOeval handles them from the GT.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Callable[[Image.Image, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]] | None = None,
        with_masks: bool = False,
        bad_boxes: Literal["error", "skip"] = "error",
        limit: int | None = None,
        skip_empty: bool = False,
    ) -> None:
        """`skip_empty` leaves out images without any annotation (crowd ones count), as
        mmdetection's training sets do (`filter_empty_gt`); `limit` then keeps the first N."""
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.with_masks = with_masks
        self.coco = load_coco_json(self.ann_file, self.image_dir, bad_boxes=bad_boxes)

        cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
        self.label_to_cat_id = {i + 1: cid for i, cid in enumerate(cat_ids)}
        self.cat_names = [str(self.coco.cats[cid]["name"]) for cid in cat_ids]

        self.ids: list[int] = selected_ids(self.coco, skip_empty, limit)
        self._anns = {img_id: self._training_anns(img_id) for img_id in self.ids}

    @property
    def num_classes(self) -> int:
        """Foreground classes (labels run 1..num_classes; 0 is background)."""
        return len(self.cat_names)

    def __len__(self) -> int:
        return len(self.ids)

    def _training_anns(self, img_id: int) -> list[dict[str, Any]]:
        """Non-crowd, non-ignored annotations whose box keeps a positive size once clipped."""
        info = self.coco.imgs[img_id]
        width, height = float(info["width"]), float(info["height"])
        out = []
        for ann in self.coco.imgToAnns.get(img_id, []):
            if ann.get("iscrowd", 0) or ann.get("ignore", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                continue
            out.append({"ann": ann, "box": (x1, y1, x2, y2)})
        return out

    def _target(self, img_id: int) -> dict[str, Any]:
        anns = self._anns[img_id]
        info = self.coco.imgs[img_id]
        height, width = int(info["height"]), int(info["width"])
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["ann"]["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(img_id),
            "area": torch.tensor(
                [float(a["ann"].get("area", (b[2] - b[0]) * (b[3] - b[1]))) for a, b in zip(anns, boxes.tolist())],
                dtype=torch.float32,
            ),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for i, a in enumerate(anns):
                if a["ann"].get("segmentation"):
                    masks[i] = self.coco.annToMask(a["ann"])
                else:  # no polygon: the box is the best mask there is
                    x1, y1, x2, y2 = a["box"]
                    masks[i, int(y1) : math.ceil(y2), int(x1) : math.ceil(x2)] = 1
            target["masks"] = torch.from_numpy(masks)
        return target

    def load_image(self, img_id: int) -> Image.Image:
        info = self.coco.imgs[img_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, SyntaxError) as exc:
            raise DataError(f"{self.ann_file}: image id {img_id}: cannot read {path}: {exc}") from None
        if image.size != (int(info["width"]), int(info["height"])):
            raise DataError(
                f"{self.ann_file}: image id {img_id}: {path} is {image.size[0]}x{image.size[1]} "
                f"but the JSON says {info['width']}x{info['height']}"
            )
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img_id = self.ids[index]
        image = self.load_image(img_id)
        target = self._target(img_id)
        if self.transforms is not None:
            return self.transforms(image, target)
        from torchvision.transforms.v2 import functional as F

        return F.pil_to_tensor(image), target
