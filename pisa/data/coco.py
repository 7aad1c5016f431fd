"""COCO-format detection dataset, validated when it is loaded.

Bad annotations are caught at construction time (not halfway through epoch 7 on worker 5),
and every error names the JSON file and the annotation or image id so it can be fixed.
Targets follow the torchvision detection format, so any torchvision detector can consume them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from pisa.core.errors import DataError

__all__ = ["DataError", "CocoDetection", "load_coco_json", "BOX_TOLERANCE"]

log = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0
"""Pixels a box may stick out of its image before it counts as outside (rounding in converters)."""

_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")
_CAT_KEYS = ("id", "name")


def _quiet_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO built from an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def require_annotation_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")


def require_image_dir(ann_file: Path, image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise DataError(f"{ann_file}: image directory {image_dir} not found")


def _read_json(path: Path) -> dict[str, Any]:
    require_annotation_file(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _require(items: Any, section: str, keys: tuple[str, ...], path: Path) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise DataError(f"{path}: '{section}' must be a list, got {type(items).__name__}")
    what = section.rstrip("s")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {section}[{index}] must be an object")
        missing = [k for k in keys if k not in item]
        if missing:
            ident = f"{what} id {item['id']}" if "id" in item else f"{section}[{index}] (no id)"
            raise DataError(f"{path}: {ident}: missing key(s) {', '.join(repr(k) for k in missing)}")
    return items


def _box_problem(bbox: Any, width: float, height: float) -> str | None:
    """Why a COCO xywh box is unusable, or None if it is fine."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be [x, y, w, h], got {bbox!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return f"bbox must hold numbers, got {bbox!r}"
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"bbox has a non-finite value {bbox!r}"
    if w <= 0 or h <= 0:
        return f"bbox {bbox!r} has width or height <= 0"
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return (
            f"bbox {bbox!r} (x2={x + w:g}, y2={y + h:g}) lies outside the "
            f"{width:g}x{height:g} image (tolerance {tol:g}px)"
        )
    return None


def load_coco_json(
    ann_file: str | Path,
    image_dir: str | Path | None = None,
    bad_boxes: Literal["error", "skip"] = "error",
) -> COCO:
    """Read and validate a COCO detection JSON; return a pycocotools index of it.

    Always raises `DataError` for malformed JSON, missing keys, unknown image or category ids,
    duplicate ids and (when `image_dir` is given) missing image files. Boxes with w<=0, h<=0 or
    outside their image raise with `bad_boxes="error"`, and are dropped from the returned index
    with a warning naming each annotation id with `bad_boxes="skip"`, so training and
    evaluation see the same ground truth. Long because each check has its own one-line
    error naming the file and field; they run in one pass over the file.
    """
    path = Path(ann_file)
    if bad_boxes not in ("error", "skip"):
        raise ValueError(f"bad_boxes must be 'error' or 'skip', got {bad_boxes!r}")
    data = _read_json(path)
    for section in ("images", "annotations", "categories"):
        if section not in data:
            raise DataError(f"{path}: missing top-level key '{section}'")
    images = _require(data["images"], "images", _IMAGE_KEYS, path)
    anns = _require(data["annotations"], "annotations", _ANN_KEYS, path)
    cats = _require(data["categories"], "categories", _CAT_KEYS, path)
    if not cats:
        raise DataError(f"{path}: 'categories' is empty")

    img_by_id: dict[Any, dict[str, Any]] = {}
    img: dict[str, Any] | None
    for img in images:
        if img["id"] in img_by_id:
            raise DataError(f"{path}: image id {img['id']}: duplicate image id")
        w, h = img["width"], img["height"]
        if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
            raise DataError(f"{path}: image id {img['id']}: invalid size {w!r}x{h!r}")
        img_by_id[img["id"]] = img
    cat_ids: set[Any] = set()
    for cat in cats:
        if cat["id"] in cat_ids:
            raise DataError(f"{path}: category id {cat['id']}: duplicate category id")
        cat_ids.add(cat["id"])

    if image_dir is not None:
        root = Path(image_dir)
        require_image_dir(path, root)
        missing = [img for img in images if not os.path.exists(root / img["file_name"])]
        if missing:
            listed = "; ".join(f"{root / m['file_name']} (image id {m['id']})" for m in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(f"{path}: {len(missing)} image file(s) not found: {listed}{more}")

    seen_ann_ids: set[Any] = set()
    bad: list[tuple[Any, str]] = []
    for ann in anns:
        aid = ann["id"]
        if aid in seen_ann_ids:
            raise DataError(f"{path}: annotation id {aid}: duplicate annotation id")
        seen_ann_ids.add(aid)
        img = img_by_id.get(ann["image_id"])
        if img is None:
            raise DataError(f"{path}: annotation id {aid}: unknown image id {ann['image_id']!r}")
        if ann["category_id"] not in cat_ids:
            raise DataError(
                f"{path}: annotation id {aid}: unknown category id {ann['category_id']!r} (known: {sorted(cat_ids)})"
            )
        problem = _box_problem(ann["bbox"], float(img["width"]), float(img["height"]))
        if problem is not None:
            bad.append((aid, f"annotation id {aid} (image id {ann['image_id']}): {problem}"))

    if bad:
        if bad_boxes == "error":
            listed = "\n  ".join(msg for _, msg in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DataError(
                f"{path}: {len(bad)} bad box(es) (set data.bad_boxes: skip to drop them):\n  {listed}{more}"
            )
        for _, msg in bad:
            log.warning("%s: skipping %s", path, msg)
        ids = [aid for aid, _ in bad]
        shown = ", ".join(str(i) for i in ids[:100]) + (" ..." if len(ids) > 100 else "")
        warnings.warn(
            f"{path}: skipped {len(bad)} bad box(es), annotation ids: {shown}",
            stacklevel=3,
        )
        drop = set(ids)
        data = dict(data)
        data["annotations"] = [a for a in anns if a["id"] not in drop]
    return _quiet_coco(data)


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

        ids = sorted(self.coco.imgs)
        if skip_empty:
            annotated = {ann["image_id"] for ann in self.coco.anns.values()}
            ids = [i for i in ids if i in annotated]
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            ids = ids[:limit]
        self.ids: list[int] = ids
        self._anns = {img_id: self._training_anns(img_id) for img_id in ids}

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
