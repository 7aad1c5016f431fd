"""Data loading: synthetic generator, COCO dataset and its validation, transforms, BCCD."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.ops import box_iou

from pisa.core.config import DataConfig, SyntheticConfig
from pisa.data import (
    CLASSES,
    CocoDetection,
    DataError,
    build_dataset,
    build_transforms,
    collate_fn,
    ensure_synthetic,
    generate_synthetic,
    synth_command,
)

# ---------------------------------------------------------------- handmade datasets


def write_coco(
    root: Path,
    images: list[tuple[int, int, int]],
    annotations: list[dict],
    categories: list[dict] | None = None,
    skip_files: tuple[int, ...] = (),
) -> tuple[Path, Path]:
    """Write `images` (id, width, height) as PNGs with a gradient and a COCO JSON; return paths."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, width, height in images:
        name = f"img_{image_id}.png"
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
        if image_id not in skip_files:
            xs = np.linspace(0, 255, width, dtype=np.float64)
            pixels = np.broadcast_to(xs[None, :, None], (height, width, 3)).astype(np.uint8)
            Image.fromarray(np.ascontiguousarray(pixels)).save(img_dir / name)
    doc = {
        "images": entries,
        "annotations": annotations,
        "categories": categories or [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
    }
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(doc, indent=1))
    return img_dir, ann_file


def ann(aid: int, image_id: int, bbox: list[float], category_id: int = 1, **extra) -> dict:
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": float(bbox[2] * bbox[3]),
        "iscrowd": 0,
        **extra,
    }


# ---------------------------------------------------------------- synthetic generator


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_same_seed_is_byte_identical(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", n_train=6, n_val=3, seed=7)
    generate_synthetic(tmp_path / "b", n_train=6, n_val=3, seed=7)
    generate_synthetic(tmp_path / "c", n_train=6, n_val=3, seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sorted(a) == sorted(b) == sorted(c)
    assert len([k for k in a if k.endswith(".png")]) == 9
    assert a == b
    assert a["train.json"] != c["train.json"] and a["val.json"] != c["val.json"]
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in pngs)


def test_synthetic_val_independent_of_train_size(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", n_train=2, n_val=3, seed=1)
    generate_synthetic(tmp_path / "b", n_train=5, n_val=3, seed=1)
    assert (tmp_path / "a/val.json").read_bytes() == (tmp_path / "b/val.json").read_bytes()


def test_synthetic_annotations_are_valid(synthetic_dir: Path) -> None:
    ds = CocoDetection(synthetic_dir / "train", synthetic_dir / "train.json")
    coco = ds.coco
    assert [c["name"] for c in coco.loadCats(sorted(coco.cats))] == list(CLASSES)
    anns = coco.dataset["annotations"]
    assert len(coco.imgs) == 24 and len(anns) >= 24
    per_image = {img_id: len(coco.imgToAnns.get(img_id, [])) for img_id in coco.imgs}
    assert 1 <= min(per_image.values()) and max(per_image.values()) <= 6
    for a in anns:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert a["category_id"] in coco.cats and a["iscrowd"] == 0
        # the box is tight around the polygon's pixels, and the area counts them
        mask = coco.annToMask(a)
        ys, xs = np.nonzero(mask)
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
        assert a["area"] == int(mask.sum())
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).sum() > 0 and ((areas >= 32**2) & (areas < 96**2)).sum() > 0
    assert areas.max() / areas.min() > 30
    # every class appears, and some boxes overlap (crowded neighbourhoods)
    assert {a["category_id"] for a in anns} == {1, 2, 3}
    overlapping = 0
    for img_id in coco.imgs:
        boxes = torch.tensor(
            [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (a["bbox"] for a in coco.imgToAnns.get(img_id, []))],
            dtype=torch.float32,
        )
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        overlapping += int((iou > 0).any())
    assert overlapping >= 3


def test_synthetic_shapes_contrast_with_background(synthetic_dir: Path) -> None:
    ds = CocoDetection(synthetic_dir / "val", synthetic_dir / "val.json", with_masks=True)
    for i in range(len(ds)):
        image, target = ds[i]
        image = image.float() / 255  # uint8 from the loader
        for mask in target["masks"].bool():
            ring = torch.nn.functional.max_pool2d(mask[None, None].float(), 7, 1, 3)[0, 0].bool() & ~mask
            inside = image[:, mask].mean(dim=1)
            around = image[:, ring].mean(dim=1)
            assert (inside - around).abs().max() > 0.15


def test_synth_command_prints_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    counts = synth_command(tmp_path / "s", train=3, val=2, seed=0, image_size=64)
    out = capsys.readouterr().out
    assert counts["train"]["images"] == 3 and counts["val"]["images"] == 2
    assert "train: 3 images" in out and "val: 2 images" in out and str(tmp_path / "s") in out
    assert Image.open(tmp_path / "s/train/000000.png").size == (64, 64)


def test_ensure_synthetic_concurrent_calls_agree(tmp_path: Path) -> None:
    cfg = SyntheticConfig(out=tmp_path / "syn", train=4, val=2, seed=3)
    results, errors = [], []

    def call() -> None:
        try:
            results.append(ensure_synthetic(cfg))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [tmp_path / "syn"] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temporary folders left
    generate_synthetic(tmp_path / "ref", 4, 2, seed=3)
    assert _files(tmp_path / "syn") == _files(tmp_path / "ref")
    mtime = (tmp_path / "syn/train.json").stat().st_mtime_ns
    assert ensure_synthetic(cfg) == tmp_path / "syn"
    assert (tmp_path / "syn/train.json").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="synthetic.out"):
        ensure_synthetic(SyntheticConfig(out=tmp_path / "syn", train=5, val=2, seed=3))


def test_build_dataset_generates_synthetic(tmp_path: Path) -> None:
    cfg = DataConfig(synthetic=SyntheticConfig(out=tmp_path / "syn", train=5, val=3), train_limit=4)
    train = build_dataset(cfg, "train", train=True)
    val = build_dataset(cfg, "val", train=False, with_masks=True)
    assert len(train) == 4 and len(val) == 3
    assert train.num_classes == 3 and train.cat_names == list(CLASSES)
    assert train.label_to_cat_id == {1: 1, 2: 2, 3: 3}
    image, target = val[0]
    assert image.shape == (3, 128, 128) and target["masks"].shape[1:] == (128, 128)
    with pytest.raises(ValueError, match="split"):
        build_dataset(cfg, "test", train=False)


# ---------------------------------------------------------------- dataset


def test_labels_are_contiguous_from_sorted_category_ids(tmp_path: Path) -> None:
    cats = [{"id": 42, "name": "c42"}, {"id": 5, "name": "c5"}, {"id": 10, "name": "c10"}]
    anns = [ann(1, 1, [0, 0, 4, 4], 42), ann(2, 1, [5, 5, 4, 4], 5), ann(3, 1, [10, 10, 4, 4], 10)]
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32)], anns, cats)
    ds = CocoDetection(img_dir, ann_file)
    assert ds.num_classes == 3
    assert ds.label_to_cat_id == {1: 5, 2: 10, 3: 42}
    assert ds.cat_names == ["c5", "c10", "c42"]
    image, target = ds[0]
    assert target["labels"].tolist() == [3, 1, 2]
    assert target["labels"].dtype == torch.int64 and target["image_id"] == 1
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)


def test_horizontal_flip_moves_boxes_and_masks(tmp_path: Path) -> None:
    seg = [[10, 5, 30, 5, 30, 15, 10, 15]]
    img_dir, ann_file = write_coco(tmp_path, [(1, 100, 50)], [ann(1, 1, [10, 5, 20, 10], segmentation=seg)])
    plain = CocoDetection(img_dir, ann_file, transforms=build_transforms(False), with_masks=True)
    flipped = CocoDetection(img_dir, ann_file, transforms=build_transforms(True, flip_prob=1.0), with_masks=True)
    img0, t0 = plain[0]
    img1, t1 = flipped[0]
    assert t0["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0]]
    assert t1["boxes"].tolist() == [[70.0, 5.0, 90.0, 15.0]]
    assert torch.equal(img1, img0.flip(-1))
    assert torch.equal(t1["masks"], t0["masks"].flip(-1))
    ys, xs = torch.nonzero(t1["masks"][0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (70, 90)
    assert type(t1["boxes"]) is torch.Tensor and type(img1) is torch.Tensor
    assert t1["labels"].tolist() == [1] and t1["area"].tolist() == [200.0]


def test_max_size_shrinks_only_large_images(tmp_path: Path) -> None:
    img_dir, ann_file = write_coco(
        tmp_path, [(1, 100, 50), (2, 40, 20)], [ann(1, 1, [10, 6, 20, 10]), ann(2, 2, [4, 4, 8, 8])]
    )
    ds = CocoDetection(img_dir, ann_file, transforms=build_transforms(False, max_size=50))
    image, target = ds[0]
    assert image.shape == (3, 25, 50)
    assert target["boxes"].tolist() == [[5.0, 3.0, 15.0, 8.0]]
    assert target["area"].tolist() == [50.0]
    assert target["orig_size"].tolist() == [50, 100]
    image, target = ds[1]
    assert image.shape == (3, 20, 40) and target["boxes"].tolist() == [[4.0, 4.0, 12.0, 12.0]]


def test_empty_image_and_crowd_and_ignore(tmp_path: Path) -> None:
    anns = [
        ann(1, 1, [2, 2, 10, 10]),
        ann(2, 1, [1, 1, 20, 20], iscrowd=1),
        ann(3, 1, [5, 5, 6, 6], ignore=1),
    ]
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32), (2, 32, 24)], anns)
    ds = CocoDetection(img_dir, ann_file, with_masks=True)
    assert len(ds) == 2
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2.0, 2.0, 12.0, 12.0]]
    assert target["iscrowd"].tolist() == [0] and target["masks"].shape == (1, 32, 32)
    assert target["masks"].dtype == torch.uint8 and target["masks"].sum().item() == 100
    assert len(ds.coco.anns) == 3  # the crowd region stays in the ground truth for COCOeval
    image, target = ds[1]
    assert image.shape == (3, 24, 32)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["masks"].shape == (0, 24, 32)


def test_masks_from_synthetic_polygons(synthetic_dir: Path) -> None:
    ds = CocoDetection(synthetic_dir / "val", synthetic_dir / "val.json", with_masks=True)
    for i in range(len(ds)):
        image, target = ds[i]
        n = len(target["boxes"])
        assert target["masks"].shape == (n, 128, 128) and target["masks"].dtype == torch.uint8
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.equal(got, box)


def test_collate_and_distributed_sampler(tmp_path: Path) -> None:
    img_dir, ann_file = write_coco(
        tmp_path, [(1, 32, 32), (2, 40, 20), (3, 16, 16)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [2, 2, 3, 3])]
    )
    ds = CocoDetection(img_dir, ann_file, transforms=build_transforms(False), limit=3)
    images, targets = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_fn)))
    assert [tuple(i.shape) for i in images] == [(3, 32, 32), (3, 20, 40), (3, 16, 16)]
    assert [t["image_id"] for t in targets] == [1, 2, 3]
    ranks = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert ranks == [[0, 2], [1, 0]]
    assert len(CocoDetection(img_dir, ann_file, limit=2)) == 2


# ---------------------------------------------------------------- validation errors


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "images": [\n    {"id": 1,, "file_name": "a.png"}\n  ]\n}\n')
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as info:
        CocoDetection(tmp_path / "images", bad)
    assert str(info.value).startswith(f"{bad}:3:14: malformed JSON")


def test_missing_image_names_file_and_image_id(tmp_path: Path) -> None:
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32), (17, 32, 32)], [ann(1, 1, [1, 1, 5, 5])], skip_files=(17,))
    with pytest.raises(DataError) as info:
        CocoDetection(img_dir, ann_file, bad_boxes="skip")
    msg = str(info.value)
    assert str(ann_file) in msg and str(img_dir / "img_17.png") in msg and "image id 17" in msg


@pytest.mark.parametrize(
    ("bbox", "why"),
    [
        ([4, 4, 0, 5], "width or height <= 0"),
        ([4, 4, 5, -2], "width or height <= 0"),
        ([20, 4, 14, 5], "outside"),
        ([-3, 4, 5, 5], "outside"),
        ([4, 4, 5, "5"], "numbers"),
    ],
)
def test_bad_box_names_file_and_annotation_id(tmp_path: Path, bbox: list, why: str) -> None:
    anns = [ann(1, 1, [1, 1, 5, 5]), {**ann(7, 1, [0, 0, 1, 1]), "bbox": bbox}]
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32)], anns)
    with pytest.raises(DataError) as info:
        CocoDetection(img_dir, ann_file)
    msg = str(info.value)
    assert str(ann_file) in msg and "annotation id 7 " in msg and why in msg
    assert "bad_boxes: skip" in msg


def test_box_within_tolerance_is_kept_and_clipped(tmp_path: Path) -> None:
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32)], [ann(1, 1, [-0.5, 2, 33, 10])])
    _, target = CocoDetection(img_dir, ann_file)[0]
    assert target["boxes"].tolist() == [[0.0, 2.0, 32.0, 12.0]]


def test_unknown_category_names_annotation_id(tmp_path: Path) -> None:
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32)], [ann(1, 1, [1, 1, 5, 5]), ann(9, 1, [1, 1, 5, 5], 3)])
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as info:
            CocoDetection(img_dir, ann_file, bad_boxes=mode)
        msg = str(info.value)
        assert str(ann_file) in msg and "annotation id 9" in msg and "unknown category id 3" in msg


def test_missing_keys_and_unknown_image(tmp_path: Path) -> None:
    broken = ann(4, 1, [1, 1, 5, 5])
    del broken["bbox"]
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32)], [broken])
    with pytest.raises(DataError, match=r"annotation id 4: missing key\(s\) 'bbox'"):
        CocoDetection(img_dir, ann_file)
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32)], [ann(5, 99, [1, 1, 5, 5])])
    with pytest.raises(DataError, match="annotation id 5: unknown image id 99"):
        CocoDetection(img_dir, ann_file)
    doc = json.loads(ann_file.read_text())
    del doc["categories"]
    ann_file.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="missing top-level key 'categories'"):
        CocoDetection(img_dir, ann_file)


def test_skip_mode_drops_bad_boxes_with_warning(tmp_path: Path) -> None:
    anns = [
        ann(1, 1, [1, 1, 5, 5]),
        ann(7, 1, [4, 4, 0, 5]),
        ann(8, 1, [30, 4, 14, 5], 2),
        ann(9, 2, [2, 3, 4, 5], 2),
    ]
    img_dir, ann_file = write_coco(tmp_path, [(1, 32, 32), (2, 32, 32)], anns)
    with pytest.warns(UserWarning, match=r"skipped 2 bad box\(es\), annotation ids: 7, 8") as record:
        ds = CocoDetection(img_dir, ann_file, bad_boxes="skip")
    assert str(ann_file) in str(record[0].message)
    assert sorted(ds.coco.anns) == [1, 9]  # evaluation sees the same ground truth
    assert ds[0][1]["boxes"].tolist() == [[1.0, 1.0, 6.0, 6.0]]
    assert ds[1][1]["boxes"].tolist() == [[2.0, 3.0, 6.0, 8.0]] and ds[1][1]["labels"].tolist() == [2]


def test_image_size_mismatch_is_reported(tmp_path: Path) -> None:
    img_dir, ann_file = write_coco(tmp_path, [(3, 32, 32)], [])
    Image.new("RGB", (20, 32)).save(img_dir / "img_3.png")
    ds = CocoDetection(img_dir, ann_file)
    with pytest.raises(DataError, match="image id 3: .*img_3.png is 20x32 but the JSON says 32x32"):
        ds[0]


# ---------------------------------------------------------------- real images (BCCD)


@pytest.mark.parametrize(("split", "n_images", "n_boxes"), [("train", 292, 3922), ("val", 72, 964)])
def test_bccd_loads_without_errors(bccd_dir: Path, split: str, n_images: int, n_boxes: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(
            bccd_dir / "images",
            bccd_dir / f"{split}.json",
            with_masks=False,
            transforms=build_transforms(train=True, flip_prob=0.5, max_size=320),
        )
    assert len(ds) == n_images and ds.num_classes == 3
    assert ds.cat_names == ["Platelets", "RBC", "WBC"]
    assert len(ds.coco.anns) == n_boxes
    step = 1 if split == "val" else 25
    for i in range(0, len(ds), step):
        image, target = ds[i]
        assert image.shape == (3, 240, 320) and target["orig_size"].tolist() == [480, 640]
        boxes = target["boxes"]
        assert len(boxes) >= 1
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert boxes.min() >= 0 and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all()
        assert set(target["labels"].tolist()) <= {1, 2, 3}


def test_bccd_build_dataset_with_limit(bccd_dir: Path) -> None:
    cfg = DataConfig(
        train_images=bccd_dir / "images",
        train_annotations=bccd_dir / "train.json",
        val_images=bccd_dir / "images",
        val_annotations=bccd_dir / "val.json",
        val_limit=5,
    )
    val = build_dataset(cfg, "val", train=False)
    assert len(val) == 5 and val.ids == sorted(val.coco.imgs)[:5]
    image, target = val[0]
    assert image.shape == (3, 480, 640) and target["image_id"] == val.ids[0]


# ---------------------------------------------------------------- SSD augmentation preset


def _ssd_sample():
    from PIL import Image as PILImage

    image = PILImage.new("RGB", (120, 90), (200, 30, 30))
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [70.0, 20.0, 110.0, 80.0], [1.0, 80.0, 6.0, 88.0]]),
        "labels": torch.tensor([1, 2, 3]),
        "area": torch.tensor([2000.0, 2400.0, 40.0]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "image_id": 7,
    }
    return image, target


def test_ssd_augmentation_keeps_boxes_valid_and_drops_cropped_ones():
    from pisa.data.transforms import build_transforms

    transform = build_transforms(train=True, flip_prob=0.5, augment="ssd")
    torch.manual_seed(0)
    dropped, zoomed, kept_all = 0, 0, 0
    for _ in range(150):
        image, target = _ssd_sample()
        img, out = transform(image, target)
        h, w = img.shape[-2:]
        boxes = out["boxes"]
        assert type(boxes) is torch.Tensor and img.dtype == torch.uint8
        assert len(boxes) == len(out["labels"]) == len(out["area"]) == len(out["iscrowd"])
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        torch.testing.assert_close(out["area"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        labels = out["labels"].tolist()
        assert len(set(labels)) == len(labels) and set(labels) <= {1, 2, 3}
        dropped += len(labels) < 3
        kept_all += len(labels) == 3
        zoomed += max(h, w) > 120
    # the crop removes boxes in some draws, the zoom-out enlarges the canvas in others
    assert dropped > 5 and kept_all > 5 and zoomed > 5


def test_augment_preset_from_config(tmp_path):
    from pisa.core.config import DataConfig
    from pisa.data import build_dataset

    cfg = DataConfig(synthetic={"out": tmp_path / "syn", "train": 2, "val": 1, "image_size": 64}, augment="ssd")
    assert build_dataset(cfg, "train", train=True).transforms.augment == "ssd"
    assert build_dataset(cfg, "val", train=False).transforms.augment == "flip"
    with pytest.raises(ValueError, match="augment"):
        DataConfig(synthetic={"out": tmp_path / "syn"}, augment="mosaic")
