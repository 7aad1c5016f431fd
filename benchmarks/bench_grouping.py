"""The padding that grouping batches by aspect ratio saves (`data.group_by_aspect_ratio`).

A two-stage or RetinaNet detector resizes each image (shorter side `model.min_size`, longer at
most `model.max_size`, as torchvision's `GeneralizedRCNNTransform`) and pads a worker's batch to
its largest height and width, rounded up to 32. This counts, over whole epochs of the training
order each sampler gives, the share of every worker's batch tensor that is padding, and the
batch pixels per image (what the backbone and FPN convolve), plain DistributedSampler against
the grouped sampler (`pisa.data.grouping`), for several layouts of one global batch. Pure
arithmetic on the image sizes: nothing is decoded or trained.

Sizes: a COCO-like synthetic set by default (longer side 640, shorter side uniform in
[360, 640], landscape with probability 2/3; COCO's own are mostly 640 x 360-640 both ways), or
a COCO annotation file's (`--annotations`, e.g. datasets/bccd/train.json: all 640x480, one group).

    python benchmarks/bench_grouping.py
    python benchmarks/bench_grouping.py --annotations datasets/bccd/train.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import Dataset, DistributedSampler

from pisa.core.config import ModelConfig
from pisa.data.grouping import GroupedDistributedSampler

LAYOUTS = [(8, 2), (4, 4), (2, 8)]  # workers x images: the paper's 8 GPUs x 2, and packings of it


def synthetic_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """(width, height): longer side 640, shorter uniform in [360, 640], 2/3 landscape."""
    g = torch.Generator().manual_seed(seed)
    short = torch.randint(360, 641, (n,), generator=g).tolist()
    landscape = (torch.rand(n, generator=g) < 2 / 3).tolist()
    return [(640, s) if wide else (s, 640) for s, wide in zip(short, landscape)]


def resized(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after torchvision's detection resize (scale_factor, floor)."""
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return math.floor(height * scale), math.floor(width * scale)


def padded_share(sizes: list[tuple[int, int]], samplers: list, images: int, cfg: ModelConfig) -> tuple[float, float]:
    """(padding share of all batch tensors, batch pixels per image) over one epoch of `samplers`."""
    shapes = [resized(w, h, cfg.min_size, cfg.max_size) for w, h in sizes]
    real = padded = count = 0
    for sampler in samplers:
        indices = list(sampler)
        for start in range(0, len(indices), images):
            batch = [shapes[i] for i in indices[start : start + images]]
            height = math.ceil(max(h for h, _ in batch) / 32) * 32
            width = math.ceil(max(w for _, w in batch) / 32) * 32
            real += sum(h * w for h, w in batch)
            padded += len(batch) * height * width
            count += len(batch)
    return 1 - real / padded, padded / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", type=Path, help="a COCO JSON whose image sizes to use")
    parser.add_argument("--images", type=int, default=4000, help="synthetic set size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.annotations:
        doc = json.loads(args.annotations.read_text())
        sizes = [(int(im["width"]), int(im["height"])) for im in doc["images"]]
        source = str(args.annotations)
    else:
        sizes = synthetic_sizes(args.images, args.seed)
        source = f"synthetic COCO-like, {args.images} images"
    groups = [int(w > h) for w, h in sizes]
    cfg = ModelConfig()
    print(
        f"{source}: {sum(groups)} landscape / {len(groups) - sum(groups)} other; resize {cfg.min_size}/{cfg.max_size}"
    )
    print(
        f"{'layout':>7} {'plain pad':>10} {'grouped pad':>12} {'plain px/img':>13} {'grouped px/img':>15} {'saved':>7}"
    )
    for workers, images in LAYOUTS:
        plain_pad, plain_px, grouped_pad, grouped_px = [], [], [], []
        for epoch in range(args.epochs):
            # a DistributedSampler reads its dataset's length only
            dataset = cast("Dataset[tuple[int, int]]", sizes)
            plain: list[DistributedSampler[tuple[int, int]]] = [
                DistributedSampler(dataset, workers, rank, shuffle=True, seed=args.seed) for rank in range(workers)
            ]
            grouped = [
                GroupedDistributedSampler(groups, workers, rank, images, seed=args.seed) for rank in range(workers)
            ]
            for s in plain + grouped:
                s.set_epoch(epoch)
            pad, px = padded_share(sizes, plain, images, cfg)
            plain_pad.append(pad)
            plain_px.append(px)
            pad, px = padded_share(sizes, grouped, images, cfg)
            grouped_pad.append(pad)
            grouped_px.append(px)
        p_pad, g_pad = sum(plain_pad) / args.epochs, sum(grouped_pad) / args.epochs
        p_px, g_px = sum(plain_px) / args.epochs, sum(grouped_px) / args.epochs
        print(
            f"{workers}x{images:<5} {p_pad:>10.1%} {g_pad:>12.1%} {p_px / 1e6:>12.3f}M {g_px / 1e6:>14.3f}M "
            f"{1 - g_px / p_px:>7.1%}"
        )


if __name__ == "__main__":
    main()
