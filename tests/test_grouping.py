"""Batches grouped by aspect ratio per global batch (`pisa.data.grouping`): one orientation per
step, the same images per step in every layout, DistributedSampler's order for one group, and a
deterministic order that a resumed run replays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_experiment
from torch.utils.data import DistributedSampler

from pisa.core.config import parse_config
from pisa.data import CocoDetection
from pisa.data.draws import PerImageDraws
from pisa.data.grouping import GroupedDistributedSampler, aspect_ratio_groups, grouped_global_order
from pisa.training.device_plan import plan_for
from pisa.training.loaders import build_train_loader

LAYOUTS = [(1, 4), (2, 2), (4, 1)]


def _groups(n: int, seed: int = 3) -> list[int]:
    """About two landscape images for each portrait one, in a random order."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < 2 / 3).long().tolist()


def _steps(groups: list[int], workers: int, images: int, seed: int, epoch: int) -> list[list[int]]:
    """Each step's images over all workers, as each worker's DataLoader batches its indices."""
    per_rank = []
    for rank in range(workers):
        sampler = GroupedDistributedSampler(groups, workers, rank, images, seed=seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        per_rank.append([indices[i : i + images] for i in range(0, len(indices), images)])
    return [sorted(i for batches in per_rank for i in batches[step]) for step in range(len(per_rank[0]))]


def test_each_global_batch_holds_one_orientation_and_each_image_once() -> None:
    groups = _groups(50)
    for epoch in range(4):
        order = grouped_global_order(groups, 4, seed=0, epoch=epoch)
        assert sorted(order) == list(range(50))
        batches = [order[i : i + 4] for i in range(0, 50, 4)]
        mixed = [k for k, batch in enumerate(batches) if len({groups[i] for i in batch}) > 1]
        # the two groups' leftovers (< 4 images each) close the epoch: at most one mixed step
        assert len(mixed) <= 1 and all(k >= len(batches) - 2 for k in mixed), (epoch, mixed)


def test_layouts_of_one_global_batch_see_the_same_images_at_every_step() -> None:
    groups = _groups(48)
    for epoch in (0, 1):
        steps = {layout: _steps(groups, *layout, seed=7, epoch=epoch) for layout in LAYOUTS}
        assert len(steps[(1, 4)]) == 12
        assert steps[(2, 2)] == steps[(1, 4)] and steps[(4, 1)] == steps[(1, 4)]
        assert all(len({groups[i] for i in step}) == 1 for step in steps[(1, 4)][:-2])


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_one_group_is_distributed_samplers_order(workers: int) -> None:
    """BCCD (all 640x480) and the synthetic squares train in the order they trained in before."""
    dataset = list(range(13))  # 13: DistributedSampler pads every layout but the first
    for epoch in range(3):
        for rank in range(workers):
            plain = DistributedSampler(dataset, num_replicas=workers, rank=rank, shuffle=True, seed=5)
            grouped = GroupedDistributedSampler([0] * 13, workers, rank, images_per_worker=2, seed=5)
            plain.set_epoch(epoch)
            grouped.set_epoch(epoch)
            assert list(grouped) == list(plain) and len(grouped) == len(plain)


def test_the_order_is_deterministic_and_a_resumed_sampler_replays_it() -> None:
    groups = _groups(40)

    def fresh(seed: int = 0) -> GroupedDistributedSampler:
        return GroupedDistributedSampler(groups, 2, 1, images_per_worker=2, seed=seed)

    uninterrupted = fresh()
    epochs = []
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        epochs.append(list(uninterrupted))
    interrupted = fresh()  # stopped mid-epoch 1, then resumed at epoch 2 (from its checkpoint)
    interrupted.set_epoch(1)
    it = iter(interrupted)
    _ = [next(it) for _ in range(5)]
    interrupted.set_epoch(2)
    resumed = fresh()
    resumed.set_epoch(2)
    assert list(interrupted) == list(resumed) == epochs[2]
    assert epochs[0] != epochs[1] != epochs[2]
    other = fresh(seed=1)
    assert list(other) != epochs[0]


def _coco_without_pixels(root: Path, sizes: list[tuple[int, int]]) -> CocoDetection:
    """A COCO set whose image files are not images: the groups must come from the JSON alone."""
    (root / "images").mkdir(parents=True)
    images = []
    for i, (width, height) in enumerate(sizes):
        (root / "images" / f"{i}.jpg").write_bytes(b"not a jpeg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": width, "height": height})
    doc = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (root / "ann.json").write_text(json.dumps(doc))
    return CocoDetection(root / "images", root / "ann.json")


def test_groups_come_from_the_annotation_sizes(tmp_path: Path) -> None:
    dataset = _coco_without_pixels(tmp_path, [(640, 480), (480, 640), (500, 500), (640, 427), (1, 2)])
    assert aspect_ratio_groups(dataset) == [1, 0, 0, 1, 0]  # mmdetection's flag: width > height
    assert aspect_ratio_groups(PerImageDraws(dataset, seed=0)) == [1, 0, 0, 1, 0]
    assert aspect_ratio_groups([object()] * 3) == [0, 0, 0]  # no sizes: one group


@pytest.mark.parametrize("grouped", [True, False])
def test_the_training_loader_groups_when_the_config_says(tmp_path: Path, grouped: bool) -> None:
    sizes = [(640, 480), (480, 640)] * 4
    dataset = PerImageDraws(_coco_without_pixels(tmp_path / "set", sizes), seed=0)
    cfg = parse_config(tiny_experiment(tmp_path, tmp_path))
    assert cfg.data.group_by_aspect_ratio  # the default: as mmdetection's configs train
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"group_by_aspect_ratio": grouped})})
    loader = build_train_loader(dataset, cfg, 0, 2, plan_for(cfg.train, "cpu", 2))
    sampler = loader.sampler
    assert isinstance(sampler, GroupedDistributedSampler) is grouped
    if grouped:
        assert sampler.global_batch == 2 * cfg.train.images_per_worker
        order = sampler.global_order()
        assert all(len({sizes[i] for i in order[k : k + 4]}) == 1 for k in range(0, 8, 4))
