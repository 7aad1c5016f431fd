"""SSD's training item on one core: before (torchvision's transforms), the reference-exact order,
and the loader's transform, paired on the same images and the same draws in one run.

Each item is what a loader worker makes: the JPEG decoded, the target built, the training
transform run to the fixed input (`build_dataset(..., train=True, fixed_size=300)`, flip 0.5).
Variants, timed per image in a rotating order, one thread (a loader worker's):

- `none`: no SSD augmentation (the `flip` preset), the resize to 300 only;
- `before`: the previous transform, torchvision's `RandomPhotometricDistort`, `RandomZoomOut`
  (the whole canvas), `RandomIoUCrop`, `SanitizeBoundingBoxes`, then the resize;
- `reference`: mmdetection's semantics done step by step (`reference_ssd_augment`);
- `after`: the loader's transform (`ssd_augment`: only the pixels the resize reads).

`reference` and `after` get the same draws (the same seed per image) and give the same boxes.
Printed: each variant's median ms per item, and the paired after/before and after/reference
ratios' medians. Uses datasets/bccd (640x480 JPEGs) when present, else generated 640x480 images.

    python benchmarks/bench_ssd_transform.py --images 100 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

import pisa.data.transforms as transforms_module
from pisa.core.config import DataConfig
from pisa.data import build_dataset
from pisa.data.ssd_augment import reference_ssd_augment, ssd_augment
from pisa.data.transforms import DetectionTransform

REPO = Path(__file__).resolve().parents[1]
SIZE = 300


class Before(DetectionTransform):
    """The SSD transform as it was before mmdetection's semantics: torchvision's v2 ops."""

    def __init__(self) -> None:
        super().__init__(flip_prob=0.5, augment="flip", fixed_size=SIZE)
        fill = {tv_tensors.Image: (123, 117, 104), tv_tensors.Mask: 0}
        per_box = ("labels", "area", "iscrowd")
        self.old = v2.Compose(
            [
                v2.RandomPhotometricDistort(p=0.5),
                v2.RandomZoomOut(fill=fill, side_range=(1.0, 4.0), p=0.5),
                v2.RandomIoUCrop(),
                v2.SanitizeBoundingBoxes(labels_getter=lambda inputs: tuple(inputs[1][k] for k in per_box)),
            ]
        )

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision.transforms.v2 import functional as F

        img = F.to_image(image)
        target = dict(target)
        target["boxes"] = tv_tensors.BoundingBoxes(
            target["boxes"], format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(img.shape[-2:])
        )
        img, target = self.old(img, target)
        img, target = transforms_module._resize(img, target, [SIZE, SIZE], antialias=False)
        img, target = self.flip(img, target)
        return img.as_subclass(torch.Tensor), target


class Reference(DetectionTransform):
    """The loader's transform with the step-by-step implementation swapped in."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        transforms_module.ssd_augment = reference_ssd_augment
        try:
            return super().__call__(image, target)
        finally:
            transforms_module.ssd_augment = ssd_augment


def data_config(tmp: Path) -> tuple[DataConfig, str]:
    bccd = REPO / "datasets" / "bccd"
    if (bccd / "train.json").is_file():
        cfg = DataConfig(
            train_images=bccd / "images",
            train_annotations=bccd / "train.json",
            val_images=bccd / "images",
            val_annotations=bccd / "val.json",
            augment="ssd",
        )
        return cfg, "BCCD train, 640x480 JPEG"
    from pisa.data import generate_synthetic

    generate_synthetic(tmp / "syn", n_train=64, n_val=4, seed=0, image_size=640)
    cfg = DataConfig(synthetic={"out": tmp / "syn", "train": 64, "val": 4, "image_size": 640}, augment="ssd")
    return cfg, "synthetic 640x640 PNG"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, source = data_config(Path(tmp))
        dataset = build_dataset(cfg, "train", train=True, fixed_size=SIZE)
        variants = {
            "none": DetectionTransform(flip_prob=0.5, augment="flip", fixed_size=SIZE),
            "before": Before(),
            "reference": Reference(flip_prob=0.5, augment="ssd", fixed_size=SIZE),
            "after": DetectionTransform(flip_prob=0.5, augment="ssd", fixed_size=SIZE),
        }
        names = list(variants)
        times: dict[str, list[float]] = {name: [] for name in names}
        n = min(args.images, len(dataset))
        for repeat in range(args.repeats):
            for i in range(n):
                order = names[(i + repeat) % len(names) :] + names[: (i + repeat) % len(names)]
                boxes: dict[str, torch.Tensor] = {}
                for name in order:
                    dataset.transforms = variants[name]
                    torch.manual_seed(1000 * repeat + i)  # the same draws for every variant
                    start = time.perf_counter()
                    image, target = dataset[i]
                    times[name].append(time.perf_counter() - start)
                    assert image.shape == (3, SIZE, SIZE), (name, image.shape)
                    boxes[name] = target["boxes"]
                torch.testing.assert_close(boxes["after"], boxes["reference"])  # same draws, same boxes
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"{source}: {n} images x {args.repeats} repeats, 1 thread, load average {' '.join(load)} at the end")
    for name in names:
        print(f"{name:>10}: median {1e3 * statistics.median(times[name]):6.2f} ms per item")
    for other in ("before", "reference"):
        ratios = [a / b for a, b in zip(times["after"], times[other])]
        print(f"after/{other}: paired median ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
