"""Batches grouped by aspect ratio, per global batch: less padding, the same order in every layout.

A detector pads the images of a worker's batch to the largest height and width among them, so a
portrait image batched with a landscape one trains on a mostly empty canvas. mmdetection's
`GroupSampler`/`DistributedGroupSampler` (used by every reference config) therefore fill each
batch from one of two groups, width > height or not; torchvision's detection references do the
same with `GroupedBatchSampler` (`group_by_aspect_ratio.py`).

Here the grouping is per *global* batch, the W x b images one step trains on across W workers
of b images each: the epoch's order is a DistributedSampler's permutation of (seed, epoch),
walked with one buffer per group; a buffer that reaches W x b images becomes the next global
batch (torchvision's pattern, at the global batch). The images the group buffers hold at the
end (fewer than W x b each) follow, group by group, so each image is seen once per epoch and an
epoch has as many steps as without grouping; only the last one or two steps can mix groups.
The global order is then sharded as DistributedSampler shards (padded to a multiple of W,
worker r takes every W-th image from r), so step s of any layout with the same W x b trains on
the same images (`tests/test_layouts.py`), and the order is a function of (seed, epoch, W x b)
only: a run resumed at an epoch replays it exactly. With one group (every image of the same
orientation, as BCCD's 640x480 or the synthetic squares) it *is* DistributedSampler's order.

The groups come from the annotation file's `width`/`height`: no image is decoded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["GroupedDistributedSampler", "aspect_ratio_groups", "grouped_global_order"]


def aspect_ratio_groups(dataset: Any) -> list[int]:
    """Each image's group, mmdetection's flag: 1 if wider than tall, else 0. Read from the
    dataset's COCO index (`coco.imgs[id]["width"/"height"]` for `ids`, as `CocoDetection` and
    `PerImageDraws` around it have); a dataset without them is one group."""
    coco, ids = getattr(dataset, "coco", None), getattr(dataset, "ids", None)
    if coco is None or ids is None:
        return [0] * len(dataset)
    return [int(coco.imgs[i]["width"] > coco.imgs[i]["height"]) for i in ids]


def grouped_global_order(group_ids: Sequence[int], global_batch: int, seed: int, epoch: int) -> list[int]:
    """The epoch's image order, each run of `global_batch` from one group (bar the last one or two).

    The permutation is DistributedSampler's for (seed, epoch); each image appears once."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(len(group_ids), generator=g).tolist()
    buffers: dict[int, list[int]] = {}
    order: list[int] = []
    for index in perm:
        buffer = buffers.setdefault(group_ids[index], [])
        buffer.append(index)
        if len(buffer) == global_batch:
            order.extend(buffer)
            buffer.clear()
    for group in sorted(buffers):
        order.extend(buffers[group])
    return order


class GroupedDistributedSampler(Sampler[int]):
    """DistributedSampler's interface (`set_epoch`, `len`, this rank's indices) over the grouped
    global order; the DataLoader batches them by `images_per_worker`."""

    def __init__(
        self, group_ids: Sequence[int], num_replicas: int, rank: int, images_per_worker: int, seed: int = 0
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.group_ids = list(group_ids)
        self.num_replicas = num_replicas
        self.rank = rank
        self.global_batch = num_replicas * images_per_worker
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(self.group_ids) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> list[int]:
        """All workers' indices, padded to a multiple of the workers as DistributedSampler pads."""
        order = grouped_global_order(self.group_ids, self.global_batch, self.seed, self.epoch)
        padding = self.total_size - len(order)
        if padding > 0:
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
