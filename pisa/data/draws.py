"""Random draws per image, not per worker: the same training whatever the layout.

A training's randomness comes from three places: the data order, the augmentation of each
image, and the detector's sampling of anchors and RoIs. The order is the DistributedSampler's
permutation, seeded by (train.seed, epoch) only, so step s of any layout (W workers x b images)
trains on the same W*b images. The other two are drawn here per image, from a seed that
depends on (train.seed, epoch, the image's index) and nothing else: the augmentation in the
loader under that seed, the detector's sampling from generators derived from it
(`pisa.core.sampling.image_generator`, which reads the `draw_seed` this wrapper puts in each
target). So 1 worker x 4 images, 2 x 2 and 4 x 1 draw the same numbers for the same image, and
a packed trial (fewer GPUs, more images each) is the same optimisation as the paper's layout.
It also makes a loader's draws independent of its number of worker processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from pisa.core.sampling import DRAW_SEED

__all__ = ["PerImageDraws", "image_seed"]


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's draws in one epoch: distinct for every (seed, epoch, index) a
    training meets (index < 10**7, epoch < 10**5), and below 2**62 (a Python int, a generator seed)."""
    return (seed % 2**20) * 10**12 + epoch * 10**7 + index


class PerImageDraws(Dataset):
    """`dataset` whose item `i` is drawn under `image_seed(seed, epoch, i)`; `set_epoch` per epoch.

    The augmentation runs under that seed (the process's RNG is restored after), and the target
    carries it as `draw_seed` for the detector's sampling. Attributes other than the item access
    (`num_classes`, `coco`, `ids`, ...) are the wrapped dataset's.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Loader workers are started per epoch: they see the epoch set before `iter(loader)`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        seed = image_seed(self.seed, self.epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, target = self.dataset[index]
        target = dict(target)
        target[DRAW_SEED] = seed
        return image, target

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"PerImageDraws({self.dataset!r}, seed={self.seed})"
