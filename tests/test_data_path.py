"""The data path to the device: uint8 images out of the loader, scaled to [0, 1] by the model;
SSD's fixed input size made in the loader, its predictions mapped back to the file's size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import to_dtype

from pisa.core.config import DataConfig, ExperimentConfig, ModelConfig
from pisa.data import CocoDetection, build_transforms, collate_fn
from pisa.evaluation import rescale_prediction
from pisa.models import build_detector, fixed_input_size
from pisa.training.epoch_eval import evaluate
from pisa.training.loaders import build_train_set, build_val_set, loader_images_per_sec

SSD_SIDE = 268  # the smallest input SSD300's feature maps allow: the quickest SSD on a CPU


def _ssd_config(**update) -> ModelConfig:
    return ModelConfig(
        detector="ssd300",
        backbone="vgg16",
        norm="frozen_bn",
        pretrained_backbone=None,
        min_size=SSD_SIDE,
        max_size=SSD_SIDE,
        score_thresh=0.0,
        **update,
    )


def _write_coco(root: Path, pixels: np.ndarray, boxes: list[list[float]]) -> tuple[Path, Path]:
    """One image (H, W, 3 uint8) with xywh `boxes` of category 1, as a COCO folder + JSON."""
    (root / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "images" / "a.png")
    height, width = pixels.shape[:2]
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, b in enumerate(boxes)
    ]
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "ann.json").write_text(json.dumps(doc))
    return root / "images", root / "ann.json"


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- uint8 to the device


def test_training_loader_yields_uint8(synthetic_dir: Path) -> None:
    cfg = ExperimentConfig(data=DataConfig(synthetic={"out": synthetic_dir, "train": 24, "val": 8}))
    loader = DataLoader(build_train_set(cfg), batch_size=4, collate_fn=collate_fn)
    images, _ = next(iter(loader))
    assert all(img.dtype == torch.uint8 and img.dim() == 3 for img in images)
    assert loader_images_per_sec(loader, batches=2) > 0


def test_model_outputs_equal_for_uint8_and_float_images() -> None:
    cfg = ModelConfig(backbone="resnet18_fpn", pretrained_backbone=None, min_size=64, max_size=64, score_thresh=0.0)
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3).eval()
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    with torch.no_grad():
        as_uint8 = model([image])[0]
        as_float = model([image.float() / 255])[0]  # a caller's float image in [0, 1]
        as_before = model([to_dtype(image, torch.float32, scale=True)])[0]  # the loader's former output
    assert len(as_uint8["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(as_uint8[key], as_float[key], rtol=1e-5, atol=1e-5)
        assert torch.equal(as_uint8[key], as_before[key])


# ---------------------------------------------------------------- SSD: the fixed size in the loader


def test_ssd_transform_resizes_to_the_fixed_size_and_scales_boxes() -> None:
    image = Image.fromarray(_noise(90, 120))
    target = {
        "boxes": torch.tensor([[10.0, 9.0, 60.0, 45.0]]),
        "labels": torch.tensor([1]),
        "area": torch.tensor([1800.0]),
        "orig_size": torch.tensor([90, 120]),
    }
    img, out = build_transforms(train=False, fixed_size=60)(image, dict(target))
    assert img.dtype == torch.uint8 and img.shape == (3, 60, 60)
    # by hand: x scales by 60 / 120 = 0.5, y by 60 / 90 = 2 / 3
    torch.testing.assert_close(out["boxes"], torch.tensor([[5.0, 6.0, 30.0, 30.0]]))
    torch.testing.assert_close(out["area"], torch.tensor([25.0 * 24.0]))
    assert out["orig_size"].tolist() == [90, 120]


def test_ssd_training_loader_output_has_the_model_input_size(tmp_path: Path) -> None:
    images, ann_file = _write_coco(tmp_path, _noise(240, 320), [[40.0, 30.0, 100.0, 80.0]])
    data = DataConfig(
        train_images=images, train_annotations=ann_file, val_images=images, val_annotations=ann_file, augment="ssd"
    )
    cfg = ExperimentConfig(model=_ssd_config(), data=data)
    assert fixed_input_size(cfg.model) == SSD_SIDE
    train, val = build_train_set(cfg), build_val_set(cfg)
    for epoch in range(10):  # an image's zoom-out and crop draws, one per epoch: each ends at the input
        train.set_epoch(epoch)
        img, target = train[0]
        assert img.dtype == torch.uint8 and img.shape == (3, SSD_SIDE, SSD_SIDE)
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= SSD_SIDE).all()
    img, target = val[0]
    assert img.shape == (3, SSD_SIDE, SSD_SIDE) and target["orig_size"].tolist() == [240, 320]
    sx, sy = SSD_SIDE / 320, SSD_SIDE / 240  # the xywh box (40, 30, 100, 80) -> xyxy, scaled
    torch.testing.assert_close(target["boxes"], torch.tensor([[40.0 * sx, 30.0 * sy, 140.0 * sx, 110.0 * sy]]))


def test_ssd_predictions_map_back_to_the_original_size() -> None:
    """The same prediction whether the model resizes the file-size image itself or the loader
    resized it and `rescale_prediction` maps the boxes back: pairs of equal columns make the
    2:1 horizontal resize exact in both, so the inputs the network sees are identical."""
    pixels = np.repeat(_noise(SSD_SIDE, SSD_SIDE), 2, axis=1)  # each column twice: 268 x 536
    assert pixels.shape[:2] == (SSD_SIDE, 2 * SSD_SIDE)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    loaded, _ = build_transforms(train=False, fixed_size=SSD_SIDE)(Image.fromarray(pixels), target)
    torch.manual_seed(0)
    model = build_detector(_ssd_config(detections_per_img=20), num_classes=2).eval()
    with torch.no_grad():
        direct = model([torch.from_numpy(pixels).permute(2, 0, 1).contiguous()])[0]
        resized = model([loaded])[0]
    mapped = rescale_prediction(resized, loaded.shape[-2:], (SSD_SIDE, 2 * SSD_SIDE))
    torch.testing.assert_close(mapped["scores"], direct["scores"])
    torch.testing.assert_close(mapped["boxes"], direct["boxes"], rtol=0, atol=1e-3)
    assert mapped["boxes"][:, 2].max() > SSD_SIDE  # in the 536-px-wide file's coordinates


class _GroundTruthModel(torch.nn.Module):
    """Predicts each loaded image's own targets (in the loader's coordinates), in dataset order."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.targets = [dataset[i][1] for i in range(len(dataset))]

    def forward(self, images):
        outs = []
        for img in images:
            target = self.targets.pop(0)
            assert img.shape[-2:] == (SSD_SIDE, SSD_SIDE)
            n = len(target["boxes"])
            outs.append({"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n)})
        return outs


def test_evaluation_maps_resized_predictions_back_for_cocoeval(tmp_path: Path) -> None:
    boxes = [[40.0, 30.0, 100.0, 80.0], [200.0, 120.0, 90.0, 100.0]]
    images, ann_file = _write_coco(tmp_path, _noise(240, 320), boxes)
    val = CocoDetection(images, ann_file, transforms=build_transforms(train=False, fixed_size=SSD_SIDE))
    metrics = evaluate(_GroundTruthModel(val), val, torch.device("cpu"), 0, 1, 2, ("bbox",))
    # unmapped, the 268x268 boxes would miss the 320x240 ground truth at IoU 0.75
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
