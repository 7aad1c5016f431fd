"""The training data as a worker sees it: its shard, its order and draws per epoch, on its device.

The order is a DistributedSampler's permutation of (train.seed, epoch), grouped by aspect ratio
per global batch (`pisa.data.grouping`); each image's augmentation and anchor/RoI draws are
seeded by (train.seed, epoch, image) (`pisa.data.draws`);
the process's own RNGs are re-seeded from (seed, epoch, rank) for anything else. All are set at
every epoch start (`seed_loader_for_epoch`, `seed_everything(epoch_seed(...))`), so an epoch
trains the same whether the run started at it or resumed into it.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from ..core.config import ExperimentConfig
from .device_plan import DevicePlan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**31


def batch_to_device(images, targets, device):
    """Per-image tensors stay 3-D: the model batches them (and sets their memory format).
    Images travel as the loader made them, uint8: the model scales them on the device."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


def build_train_loader(dataset, cfg: ExperimentConfig, rank: int, world: int, plan: DevicePlan):
    """This worker's shard of the training set, in an order fixed by (train.seed, epoch).

    With `data.group_by_aspect_ratio` each global batch holds images of one orientation
    (`pisa.data.grouping`: DistributedSampler's permutation, grouped per global batch, so every
    layout of it trains alike); else the plain DistributedSampler. Either is built here rather
    than by Ray's `prepare_data_loader`, which seeds it with 0 whatever `train.seed` says.
    Loader workers are not persistent: each epoch starts new ones whose seeds come from the
    generator `seed_loader_for_epoch` sets, so epoch N's augmentation draws do not depend on
    how many epochs ran before in this process (a resumed run replays them exactly).
    """
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from ..data import collate_fn  # pycocotools and torchvision: loaded where a worker trains
    from ..data.grouping import GroupedDistributedSampler, aspect_ratio_groups

    sampler: DistributedSampler[Any] | GroupedDistributedSampler
    if cfg.data.group_by_aspect_ratio:
        groups = aspect_ratio_groups(dataset)  # the annotation file's sizes: nothing decoded
        sampler = GroupedDistributedSampler(groups, world, rank, cfg.train.images_per_worker, seed=cfg.train.seed)
    else:
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=False
        )
    return DataLoader(
        dataset,
        batch_size=cfg.train.images_per_worker,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator(),
        drop_last=False,
        pin_memory=plan.pin_memory,  # pinned host memory: the non_blocking copies overlap
    )


def build_train_set(cfg: ExperimentConfig):
    """The training split as the engine trains on it: the `data.augment` preset, masks for
    Mask R-CNN, images brought to a fixed-size detector's input in the loader (SSD), and each
    image's draws seeded by (train.seed, epoch, image), whatever the layout (`pisa.data.draws`)."""
    from ..data import build_dataset  # pycocotools and torchvision: loaded where a worker trains
    from ..data.draws import PerImageDraws
    from ..models import fixed_input_size

    with_masks = cfg.model.has_masks
    fixed_size = fixed_input_size(cfg.model)
    dataset = build_dataset(cfg.data, "train", train=True, with_masks=with_masks, fixed_size=fixed_size)
    return PerImageDraws(dataset, cfg.train.seed)


def build_val_set(cfg: ExperimentConfig):
    """The val split as `evaluate` reads it (predictions are mapped back to `orig_size`)."""
    from ..data import build_dataset
    from ..models import fixed_input_size

    return build_dataset(cfg.data, "val", train=False, fixed_size=fixed_input_size(cfg.model))


def loader_images_per_sec(loader, batches: int) -> float:
    """Images per second `loader` yields on its own over up to `batches` batches. Timed once its
    workers run and the batches they prefetched are taken: the start-up is paid once per epoch,
    and a queue of ready batches says nothing of the rate."""
    it = iter(loader)
    for _ in range(1 + loader.num_workers * (loader.prefetch_factor or 0)):
        next(it, None)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(it, None)
        if batch is None:
            break
        images += len(batch[0])
    elapsed = time.perf_counter() - start
    return images / elapsed if images and elapsed > 0 else float("nan")


def seed_loader_for_epoch(loader, seed: int, epoch: int, rank: int) -> None:
    """The epoch's data order (sampler), its per-image draws (the dataset), and the loader
    workers' RNG seeds (generator; the per-image draws do not depend on them)."""
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(epoch_seed(seed, epoch, rank))
