"""COCO evaluation: conversion to COCO results, agreement with pycocotools, edge cases."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pisa.data import CocoDetection
from pisa.evaluation import (
    encode_masks,
    evaluate_coco,
    evaluate_coco_detailed,
    gather_predictions,
    metric_keys,
    predictions_to_coco_results,
    rescale_prediction,
)


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def handmade_gt() -> COCO:
    """Three 200x100 images, two categories (ids 3 and 8), boxes of all three COCO sizes."""
    boxes = {
        1: [(3, [10, 10, 20, 20]), (3, [50, 20, 60, 50]), (8, [120, 5, 70, 90])],
        2: [(8, [5, 5, 10, 12]), (8, [100, 40, 40, 40]), (3, [150, 10, 30, 30])],
        3: [(3, [20, 30, 110, 60])],
    }
    anns, aid = [], 1
    for image_id, items in boxes.items():
        for cat, (x, y, w, h) in items:
            anns.append(
                {
                    "id": aid,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
            aid += 1
    return _coco(
        {
            "images": [{"id": i, "width": 200, "height": 100, "file_name": f"{i}.png"} for i in (1, 2, 3)],
            "annotations": anns,
            "categories": [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}],
        }
    )


LABEL_TO_CAT = {1: 3, 2: 8}


def handmade_predictions() -> list[dict]:
    """Imperfect detections: shifted boxes, a false positive, a wrong class, a miss."""
    return [
        {
            "image_id": 1,
            "boxes": torch.tensor(
                [[11.0, 9.0, 31.0, 31.0], [52.0, 25.0, 108.0, 72.0], [118.0, 8.0, 190.0, 96.0], [0.0, 0.0, 40.0, 40.0]]
            ),
            "scores": torch.tensor([0.9, 0.75, 0.8, 0.3]),
            "labels": torch.tensor([1, 1, 2, 2]),
        },
        {
            "image_id": 2,
            "boxes": torch.tensor([[100.0, 40.0, 140.0, 80.0], [150.0, 10.0, 180.0, 40.0], [6.0, 6.0, 14.0, 16.0]]),
            "scores": torch.tensor([0.95, 0.4, 0.6]),
            "labels": torch.tensor([2, 2, 2]),
        },
        {
            "image_id": 3,
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        },
    ]


def gt_as_predictions(coco: COCO, label_of: dict[int, int], with_masks: bool = False) -> list[dict]:
    preds = []
    for image_id in sorted(coco.imgs):
        anns = coco.imgToAnns.get(image_id, [])
        pred = {
            "image_id": image_id,
            "boxes": torch.tensor(
                [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
                dtype=torch.float32,
            ).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
        }
        if with_masks:
            info = coco.imgs[image_id]
            masks = (
                np.stack([coco.annToMask(a) for a in anns])
                if anns
                else np.zeros((0, info["height"], info["width"]), np.uint8)
            )
            pred["masks"] = torch.from_numpy(masks).float()[:, None]
        preds.append(pred)
    return preds


def test_metric_keys_are_mlflow_names() -> None:
    assert metric_keys(("bbox",)) == [
        "bbox_mAP",
        "bbox_mAP_50",
        "bbox_mAP_75",
        "bbox_mAP_s",
        "bbox_mAP_m",
        "bbox_mAP_l",
        "bbox_AR_1",
        "bbox_AR_10",
        "bbox_AR_100",
        "bbox_AR_s",
        "bbox_AR_m",
        "bbox_AR_l",
    ]
    assert len(metric_keys(("bbox", "segm"))) == 24 and metric_keys(("segm",))[0] == "segm_mAP"


def test_ground_truth_as_predictions_scores_one(synthetic_dir: Path) -> None:
    ds = CocoDetection(synthetic_dir / "val", synthetic_dir / "val.json")
    label_of = {c: label for label, c in ds.label_to_cat_id.items()}
    metrics = evaluate_coco(ds.coco, gt_as_predictions(ds.coco, label_of), ds.label_to_cat_id)
    per_class = [f"bbox_AP_{name}" for name in ds.cat_names]
    assert sorted(metrics) == sorted(metric_keys(("bbox",)) + per_class)
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_50"] == pytest.approx(1.0) and metrics["bbox_mAP_75"] == pytest.approx(1.0)
    assert metrics["bbox_AR_100"] == pytest.approx(1.0)
    areas = [a["area"] for a in ds.coco.dataset["annotations"]]
    for suffix, present in (
        ("s", min(areas) < 32**2),
        ("m", any(32**2 <= a < 96**2 for a in areas)),
        ("l", max(areas) >= 96**2),
    ):
        # pycocotools' -1 for an area range without ground truth is kept
        assert metrics[f"bbox_mAP_{suffix}"] == pytest.approx(1.0 if present else -1.0)


def test_matches_direct_pycocotools_call() -> None:
    gt = handmade_gt()
    preds = handmade_predictions()
    metrics, summary = evaluate_coco_detailed(gt, preds, LABEL_TO_CAT)

    results = []  # independent conversion: xyxy -> xywh, label -> category id
    for p in preds:
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append(
                {
                    "image_id": p["image_id"],
                    "category_id": LABEL_TO_CAT[label],
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    expected = dict(zip(metric_keys(("bbox",)), reference.stats.tolist()))
    assert {k: metrics[k] for k in expected} == expected  # exactly the same numbers
    assert 0.3 < metrics["bbox_mAP"] < 0.9 and metrics["bbox_mAP_50"] > metrics["bbox_mAP_75"]
    assert "Average Precision" in summary


def test_image_ids_restrict_evaluation() -> None:
    gt = handmade_gt()
    label_of = {3: 1, 8: 2}
    perfect_first = [p for p in gt_as_predictions(gt, label_of) if p["image_id"] == 1]
    everywhere = evaluate_coco(gt, perfect_first, LABEL_TO_CAT)
    subset = evaluate_coco(gt, perfect_first, LABEL_TO_CAT, image_ids=[1])
    assert subset["bbox_mAP"] == pytest.approx(1.0)
    # category 3 has 2 of 4 boxes found, category 8 has 1 of 3, all at any IoU
    assert everywhere["bbox_AR_100"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    # 101-point interpolation: precision 1 at recall 0..0.50 (51 points) and 0..0.33 (34 points)
    assert everywhere["bbox_mAP"] == pytest.approx((51 / 101 + 34 / 101) / 2)
    # predictions outside the subset are ignored, not counted as false positives
    subset_with_others = evaluate_coco(gt, handmade_predictions()[1:] + perfect_first, LABEL_TO_CAT, image_ids=[1])
    assert subset_with_others == subset


def test_no_predictions_gives_zeros_not_a_crash() -> None:
    gt = handmade_gt()
    expected = {k: 0.0 for k in metric_keys(("bbox", "segm"))}
    expected.update({f"{t}_AP_{c}": 0.0 for t in ("bbox", "segm") for c in ("a", "b")})
    assert evaluate_coco(gt, [], LABEL_TO_CAT, iou_types=("bbox", "segm")) == expected
    empty = [
        {
            "image_id": i,
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, 100, 200),
        }
        for i in (1, 2, 3)
    ]
    assert evaluate_coco(gt, empty, LABEL_TO_CAT, iou_types=("bbox", "segm")) == expected


def test_segm_ground_truth_masks_score_one(synthetic_dir: Path) -> None:
    ds = CocoDetection(synthetic_dir / "val", synthetic_dir / "val.json")
    label_of = {c: label for label, c in ds.label_to_cat_id.items()}
    preds = gt_as_predictions(ds.coco, label_of, with_masks=True)
    metrics = evaluate_coco(ds.coco, preds, ds.label_to_cat_id, iou_types=("bbox", "segm"))
    assert metrics["segm_mAP"] == pytest.approx(1.0) and metrics["bbox_mAP"] == pytest.approx(1.0)
    assert metrics["segm_AR_100"] == pytest.approx(1.0)
    # soft masks just above/below the 0.5 threshold binarize to the same masks
    soft = [{**p, "masks": p["masks"] * 0.4 + 0.3} for p in preds]
    assert evaluate_coco(ds.coco, soft, ds.label_to_cat_id, iou_types=("segm",))["segm_mAP"] == pytest.approx(1.0)


def test_conversion_and_input_errors() -> None:
    preds = [
        {
            "image_id": 2,
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]),
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([2]),
            "masks": torch.zeros(1, 1, 100, 200),
        }
    ]
    preds[0]["masks"][0, 0, 20:60, 10:40] = 0.9
    (bbox,) = predictions_to_coco_results(preds, LABEL_TO_CAT, "bbox")
    assert bbox == {"image_id": 2, "category_id": 8, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}
    (segm,) = predictions_to_coco_results(preds, LABEL_TO_CAT, "segm")
    assert "bbox" not in segm and segm["category_id"] == 8 and isinstance(segm["segmentation"]["counts"], str)
    assert segm["segmentation"]["size"] == [100, 200]
    gt = handmade_gt()
    with pytest.raises(ValueError, match="labels \\[5\\] have no COCO category id"):
        evaluate_coco(gt, [{**preds[0], "labels": torch.tensor([5])}], LABEL_TO_CAT)
    with pytest.raises(ValueError, match="image id 99, which is not in the ground truth"):
        evaluate_coco(gt, [{**preds[0], "image_id": 99}], LABEL_TO_CAT)
    with pytest.raises(ValueError, match="masks are 100x50 but the image is 200x100"):
        evaluate_coco(gt, [{**preds[0], "masks": torch.zeros(1, 1, 50, 100)}], LABEL_TO_CAT, iou_types=("segm",))


def test_rescale_prediction_to_original_size() -> None:
    pred = {
        "image_id": 1,
        "boxes": torch.tensor([[5.0, 3.0, 15.0, 8.0]]),
        "scores": torch.ones(1),
        "labels": torch.ones(1, dtype=torch.int64),
        "masks": torch.zeros(1, 1, 25, 50),
    }
    pred["masks"][0, 0, 3:8, 5:15] = 1.0
    out = rescale_prediction(pred, (25, 50), (50, 100))
    assert out["boxes"].tolist() == [[10.0, 6.0, 30.0, 16.0]]
    assert out["masks"].shape == (1, 1, 50, 100)
    ys, xs = torch.nonzero(out["masks"][0, 0] > 0.5, as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1) == (10, 30, 6, 16)
    assert rescale_prediction(pred, (25, 50), (25, 50)) is pred


def test_gather_without_process_group_is_identity() -> None:
    preds = handmade_predictions()
    assert gather_predictions(preds) is preds


_GATHER_SCRIPT = """
import sys, torch, torch.distributed as dist
from pisa.evaluation import gather_predictions
rank, init_file, result_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
# 5 images over 2 ranks: DistributedSampler pads rank 1 with image 1 again
ids = [1, 3, 5] if rank == 0 else [2, 4, 1]
preds = [{"image_id": i, "boxes": torch.full((1, 4), float(i)), "scores": torch.tensor([0.5]),
          "labels": torch.tensor([rank + 1])} for i in ids]
out = gather_predictions(preds)
if rank == 1:
    torch.save(out, result_file)
dist.destroy_process_group()
"""


def _run_two_ranks(script: str, tmp_path: Path) -> Path:
    """Run `script` as ranks 0 and 1 of a gloo group; the file rank 1 wrote its result to."""
    init_file, result_file = tmp_path / "init", tmp_path / "out.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(rank), str(init_file), str(result_file)], env=env)
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    return result_file


def test_gather_across_two_processes_dedupes_padding(tmp_path: Path) -> None:
    out = torch.load(_run_two_ranks(_GATHER_SCRIPT, tmp_path))
    assert [p["image_id"] for p in out] == [1, 2, 3, 4, 5]
    assert out[0]["labels"].tolist() == [1]  # the first copy (rank 0's) is kept
    assert [p["boxes"][0, 0].item() for p in out] == [1.0, 2.0, 3.0, 4.0, 5.0]


# ---------------------------------------------------------------- per class, RLE masks


def test_per_class_ap_by_hand_and_its_mean_is_map() -> None:
    """Class a (id 3): its 4 GTs all found exactly -> AP 1. Class b (id 8): of its 3 GTs only
    one is found, by the second-ranked detection after a false positive; COCO's interpolated
    precision is then 0.5 up to recall 1/3 and 0 beyond: AP = 0.5 * 34 / 101 at every IoU."""
    gt = handmade_gt()
    boxes_a = {1: [[10.0, 10, 30, 30], [50, 20, 110, 70]], 2: [[150.0, 10, 180, 40]], 3: [[20.0, 30, 130, 90]]}
    preds = []
    for image_id in (1, 2, 3):
        b = boxes_a[image_id]
        labels = [1] * len(b)
        scores = [0.9] * len(b)
        if image_id == 1:
            b = b + [[0.0, 60, 10, 70]]  # false positive of class b, ranked first
            labels, scores = labels + [2], scores + [0.8]
        if image_id == 2:
            b = b + [[100.0, 40, 140, 80]]  # exact hit on one class-b GT
            labels, scores = labels + [2], scores + [0.7]
        preds.append(
            {
                "image_id": image_id,
                "boxes": torch.tensor(b),
                "scores": torch.tensor(scores),
                "labels": torch.tensor(labels),
            }
        )
    metrics = evaluate_coco(gt, preds, LABEL_TO_CAT)
    assert metrics["bbox_AP_a"] == pytest.approx(1.0)
    assert metrics["bbox_AP_b"] == pytest.approx(0.5 * 34 / 101)
    assert (metrics["bbox_AP_a"] + metrics["bbox_AP_b"]) / 2 == pytest.approx(metrics["bbox_mAP"])


def test_per_class_ap_of_a_class_without_ground_truth_is_left_out_of_the_mean() -> None:
    gt = handmade_gt()
    gt.dataset["categories"].append({"id": 9, "name": "traffic light"})
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    metrics = evaluate_coco(gt, handmade_predictions(), {**LABEL_TO_CAT, 3: 9})
    assert metrics["bbox_AP_traffic_light"] == -1.0  # no GT: COCOeval's -1, not in the mean
    assert (metrics["bbox_AP_a"] + metrics["bbox_AP_b"]) / 2 == pytest.approx(metrics["bbox_mAP"])


def test_encoded_masks_give_the_same_segm_ap(synthetic_dir: Path) -> None:
    ds = CocoDetection(synthetic_dir / "val", synthetic_dir / "val.json")
    label_of = {c: label for label, c in ds.label_to_cat_id.items()}
    preds = gt_as_predictions(ds.coco, label_of, with_masks=True)
    # damage the masks a little so that segm AP is not trivially 1
    for p in preds:
        if len(p["masks"]):
            p["masks"][0, 0, :, : p["masks"].shape[-1] // 2] = 0.0
    before = evaluate_coco(ds.coco, preds, ds.label_to_cat_id, iou_types=("bbox", "segm"))
    encoded = [encode_masks(p) for p in preds]
    for p, e in zip(preds, encoded):
        assert "masks" not in e and len(e["rles"]) == len(p["masks"])
        assert all(isinstance(r["counts"], str) and list(r["size"]) == list(p["masks"].shape[-2:]) for r in e["rles"])
    after = evaluate_coco(ds.coco, encoded, ds.label_to_cat_id, iou_types=("bbox", "segm"))
    assert after == before and before["segm_mAP"] < 0.99


_GATHER_RLE_SCRIPT = """
import pickle, sys, torch, torch.distributed as dist
from pisa.evaluation import encode_masks, gather_predictions
rank, init_file, result_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
masks = torch.zeros(3, 1, 480, 640)
masks[:, :, 100:200, 100:300] = 0.9
pred = {"image_id": rank + 1, "boxes": torch.zeros(3, 4), "scores": torch.ones(3),
        "labels": torch.ones(3, dtype=torch.int64), "masks": masks}
out = gather_predictions([encode_masks(pred)])
if rank == 1:
    torch.save({"out": out, "bytes": len(pickle.dumps(out))}, result_file)
dist.destroy_process_group()
"""


def test_gathered_mask_predictions_are_rles(tmp_path: Path) -> None:
    got = torch.load(_run_two_ranks(_GATHER_RLE_SCRIPT, tmp_path), weights_only=False)
    out = got["out"]
    assert [p["image_id"] for p in out] == [1, 2]
    for pred in out:
        assert "masks" not in pred and len(pred["rles"]) == 3
        assert all(
            isinstance(r, dict) and r["size"] == [480, 640] and isinstance(r["counts"], str) for r in pred["rles"]
        )
    # 2 images x 3 masks of 480x640 would be 7.4 MB as float32; the RLEs are a few kB
    assert got["bytes"] < 10_000
