"""COCO evaluation of torchvision-style predictions with pycocotools, as MLflow metrics.

pycocotools' COCOeval is the reference implementation the paper's numbers come from, so it is
called as is; this module only converts predictions to COCO results, silences its printing,
and names the 12 summary numbers per IoU type (`bbox_mAP`, `segm_AR_100`, ...).

Empty areas: COCOeval reports -1 for an area range (or metric) without ground truth; that value
is kept for fidelity with pycocotools. NaN never comes back (a non-finite value becomes -1).
With no predictions at all every metric is 0.0 (COCOeval cannot load an empty result list).

Per class, `bbox_AP_<class name>` (and `segm_AP_...`) is AP@[.5:.95] from COCOeval's precision
array (all areas, 100 detections): the numbers whose mean over classes with ground truth is
`bbox_mAP`. Mask predictions travel as RLEs (`encode_masks`, on each worker per batch), never as
full-resolution float masks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "METRIC_NAMES",
    "metric_keys",
    "predictions_to_coco_results",
    "evaluate_coco",
    "evaluate_coco_detailed",
    "encode_masks",
    "gather_predictions",
    "per_class_key",
    "rescale_prediction",
]

log = logging.getLogger(__name__)

METRIC_NAMES = (
    "mAP",
    "mAP_50",
    "mAP_75",
    "mAP_s",
    "mAP_m",
    "mAP_l",
    "AR_1",
    "AR_10",
    "AR_100",
    "AR_s",
    "AR_m",
    "AR_l",
)
"""Names of COCOeval.stats[0..11], in order."""

_IOU_TYPES = ("bbox", "segm")


def metric_keys(iou_types: Iterable[str] = ("bbox",)) -> list[str]:
    """The metric keys `evaluate_coco` returns, e.g. `bbox_mAP`, `segm_AR_l`."""
    return [f"{t}_{name}" for t in iou_types for name in METRIC_NAMES]


def per_class_key(iou_type: str, class_name: str) -> str:
    """MLflow-safe per-class metric name, e.g. `bbox_AP_traffic_light`."""
    return f"{iou_type}_AP_{re.sub(r'[^A-Za-z0-9_.-]+', '_', class_name.strip()) or 'unnamed'}"


def encode_masks(pred: dict[str, Any], mask_threshold: float = 0.5) -> dict[str, Any]:
    """`pred` with its (N,1,H,W) mask probabilities replaced by N COCO RLEs under `rles`.

    Thresholded where the masks are (GPU included), so only a uint8 copy reaches the host; an
    RLE of a typical instance is a few hundred bytes against H*W*4 for the float mask.
    """
    if "masks" not in pred:
        return pred
    out = {k: v for k, v in pred.items() if k != "masks"}
    binary = (pred["masks"].detach() > mask_threshold).to(torch.uint8).cpu().numpy()
    if binary.ndim == 4:
        binary = binary[:, 0]
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    out["rles"] = list(rles)
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def predictions_to_coco_results(
    predictions: Sequence[dict[str, Any]],
    label_to_cat_id: dict[int, int],
    iou_type: str = "bbox",
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO result dicts for one IoU type.

    bbox: `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` from xyxy boxes.
    segm: `{"image_id", "category_id", "segmentation": RLE, "score"}` from `rles` (see
    `encode_masks`) or from `masks` (N,1,H,W) probabilities thresholded at `mask_threshold`
    (no "bbox" key: pycocotools would then treat the results as boxes). Long because it
    covers both IoU types and both mask inputs in the one loop over predictions.
    """
    if iou_type not in _IOU_TYPES:
        raise ValueError(f"iou_type must be one of {_IOU_TYPES}, got {iou_type!r}")
    results: list[dict[str, Any]] = []
    for pred in predictions:
        image_id = int(pred["image_id"])
        scores = _as_numpy(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _as_numpy(pred["labels"]).astype(np.int64).reshape(-1)
        if len(scores) != len(labels):
            raise ValueError(f"image id {image_id}: {len(scores)} scores but {len(labels)} labels")
        unknown = sorted({int(lbl) for lbl in labels} - set(label_to_cat_id))
        if unknown:
            raise ValueError(f"image id {image_id}: labels {unknown} have no COCO category id")
        cat_ids = [int(label_to_cat_id[int(lbl)]) for lbl in labels]
        if iou_type == "bbox":
            boxes = _as_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
            if len(boxes) != len(scores):
                raise ValueError(f"image id {image_id}: {len(boxes)} boxes but {len(scores)} scores")
            for (x1, y1, x2, y2), cat, score in zip(boxes.tolist(), cat_ids, scores.tolist()):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": cat,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score,
                    }
                )
        elif "rles" in pred:
            rles = pred["rles"]
            if len(rles) != len(scores):
                raise ValueError(f"image id {image_id}: {len(rles)} masks but {len(scores)} scores")
            for rle, cat, score in zip(rles, cat_ids, scores.tolist()):
                results.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": score})
        else:
            if "masks" not in pred:
                raise ValueError(f"image id {image_id}: segm evaluation needs 'masks' in predictions")
            masks = pred["masks"]
            if isinstance(masks, torch.Tensor):
                masks = masks.detach().cpu()
                binary = (masks > mask_threshold).to(torch.uint8).numpy()
            else:
                binary = (np.asarray(masks) > mask_threshold).astype(np.uint8)
            if binary.ndim == 4:
                binary = binary[:, 0]
            if len(binary) != len(scores):
                raise ValueError(f"image id {image_id}: {len(binary)} masks but {len(scores)} scores")
            if len(binary) == 0:
                continue
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for rle, cat, score in zip(rles, cat_ids, scores.tolist()):
                rle["counts"] = rle["counts"].decode("ascii")
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": cat,
                        "segmentation": rle,
                        "score": score,
                    }
                )
    return results


def _check_images(coco_gt: COCO, predictions: Sequence[dict[str, Any]], iou_types: Sequence[str]) -> None:
    for pred in predictions:
        image_id = int(pred["image_id"])
        info = coco_gt.imgs.get(image_id)
        if info is None:
            raise ValueError(f"prediction for image id {image_id}, which is not in the ground truth")
        sizes = []
        if "segm" in iou_types and "masks" in pred and len(pred["masks"]):
            sizes.append(tuple(pred["masks"].shape[-2:]))
        if "segm" in iou_types and pred.get("rles"):
            sizes.extend(tuple(int(v) for v in rle["size"]) for rle in pred["rles"])
        for h, w in dict.fromkeys(sizes):  # each distinct size once, in order
            if (h, w) != (int(info["height"]), int(info["width"])):
                raise ValueError(
                    f"image id {image_id}: masks are {w}x{h} but the image is "
                    f"{info['width']}x{info['height']}; rescale predictions to the original size"
                )


def evaluate_coco_detailed(
    coco_gt: COCO,
    predictions: Sequence[dict[str, Any]],
    label_to_cat_id: dict[int, int],
    iou_types: Sequence[str] = ("bbox",),
    image_ids: Iterable[int] | None = None,
) -> tuple[dict[str, float], str]:
    """`evaluate_coco` plus COCOeval's printed summary table (empty for types with no results)."""
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in _IOU_TYPES:
            raise ValueError(f"iou_types must be among {_IOU_TYPES}, got {t!r}")
    if image_ids is not None:
        image_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(image_ids) - set(coco_gt.imgs))
        if unknown:
            raise ValueError(f"image_ids not in the ground truth: {unknown[:10]}")
        keep = set(image_ids)
        predictions = [p for p in predictions if int(p["image_id"]) in keep]
    _check_images(coco_gt, predictions, iou_types)

    metrics: dict[str, float] = {}
    texts: list[str] = []
    cat_ids = sorted(coco_gt.cats)
    for iou_type in iou_types:
        results = predictions_to_coco_results(predictions, label_to_cat_id, iou_type)
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in METRIC_NAMES})
            metrics.update({per_class_key(iou_type, str(coco_gt.cats[c]["name"])): 0.0 for c in cat_ids})
            texts.append(f"{iou_type}: no predictions, all metrics 0.0")
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        texts.append(f"{iou_type}:\n{buf.getvalue()}")
        for name, value in zip(METRIC_NAMES, evaluator.stats.tolist()):
            metrics[f"{iou_type}_{name}"] = float(value) if math.isfinite(value) else -1.0
        metrics.update(_per_class_ap(evaluator, coco_gt, iou_type))
    summary = "\n".join(texts)
    log.debug("COCO evaluation\n%s", summary)
    return metrics, summary


def _per_class_ap(evaluator: COCOeval, coco_gt: COCO, iou_type: str) -> dict[str, float]:
    """AP@[.5:.95] per category (all areas, max detections 100); -1 for a class without GT."""
    precision = evaluator.eval["precision"]  # (T IoUs, R recalls, K classes, A areas, M max dets)
    out: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        out[per_class_key(iou_type, str(coco_gt.cats[cat_id]["name"]))] = float(valid.mean()) if valid.size else -1.0
    return out


def evaluate_coco(
    coco_gt: COCO,
    predictions: Sequence[dict[str, Any]],
    label_to_cat_id: dict[int, int],
    iou_types: Sequence[str] = ("bbox",),
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO AP/AR of `predictions` against `coco_gt`, keyed like `bbox_mAP_50`.

    Each prediction: `{"image_id", "boxes" (N,4) xyxy in original-image pixels, "scores" (N,),
    "labels" (N,) contiguous labels mapped through `label_to_cat_id`, optional "masks"
    (N,1,H,W) probabilities at the original image size}`. `image_ids` restricts evaluation
    (ground truth and predictions) to those images, e.g. the first `val_limit` ones.
    """
    return evaluate_coco_detailed(coco_gt, predictions, label_to_cat_id, iou_types, image_ids)[0]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def gather_predictions(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every worker's predictions on every worker, one per image id, sorted by image id.

    DistributedSampler pads the last batch by repeating images, so duplicates are dropped.
    Without an initialized process group the list comes back unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return preds
    local = [_to_cpu(p) for p in preds]
    gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    seen: dict[int, dict[str, Any]] = {}
    for part in gathered:
        for pred in part or []:
            seen.setdefault(int(pred["image_id"]), pred)
    return [seen[k] for k in sorted(seen)]


def rescale_prediction(pred: dict[str, Any], from_size: Sequence[int], to_size: Sequence[int]) -> dict[str, Any]:
    """Map a prediction made on an image of `from_size` (H, W) to `to_size` (H, W).

    Needed when the data pipeline resized the image (`max_size`, or SSD's fixed square input,
    which also changes the aspect ratio): boxes are scaled per axis and masks (N,1,h,w) are
    bilinearly resized so evaluation sees the original image's pixels.
    """
    fh, fw = (int(v) for v in from_size)
    th, tw = (int(v) for v in to_size)
    if (fh, fw) == (th, tw):
        return pred
    out = dict(pred)
    boxes = pred["boxes"]
    scale = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], dtype=boxes.dtype, device=boxes.device)
    out["boxes"] = boxes * scale
    if "masks" in pred:
        masks = pred["masks"]
        if masks.numel() == 0:
            out["masks"] = masks.new_zeros((masks.shape[0], 1, th, tw))
        else:
            out["masks"] = torch.nn.functional.interpolate(
                masks.float(), size=(th, tw), mode="bilinear", align_corners=False
            )
    return out
