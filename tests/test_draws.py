"""Per-image draws: an image's augmentation and its anchor/RoI sample depend on (seed, epoch,
image) only, not on the process's RNG (which worker trains it, what ran before)."""

from __future__ import annotations

from pathlib import Path

import torch

from pisa.core.config import DataConfig, ExperimentConfig
from pisa.core.sampling import DRAW_SEED, DrawStream, RandomSampler, image_generator
from pisa.data.draws import PerImageDraws, image_seed
from pisa.training.loaders import build_train_set


def _flipped_set(synthetic_dir: Path, seed: int) -> PerImageDraws:
    data = DataConfig(synthetic={"out": synthetic_dir, "train": 24, "val": 8}, flip_prob=0.5)
    return build_train_set(ExperimentConfig(data=data, train={"seed": seed}))


def test_an_images_augmentation_depends_on_seed_epoch_and_image_only(synthetic_dir: Path) -> None:
    train = _flipped_set(synthetic_dir, seed=0)
    per_epoch = []
    for epoch in range(8):
        train.set_epoch(epoch)
        torch.manual_seed(1000 + epoch)  # whatever the process's RNG holds
        first, target = train[3]
        torch.manual_seed(7)
        again, _ = train[3]
        assert torch.equal(first, again)
        assert target[DRAW_SEED] == image_seed(0, epoch, 3)
        per_epoch.append(first)
    # flip_prob 0.5 over 8 epochs: both outcomes occur (a fixed draw would give one; P = 2/256)
    flips = {torch.equal(per_epoch[0], img) for img in per_epoch}
    assert flips == {True, False}
    before = torch.random.get_rng_state()
    train[5]
    assert torch.equal(torch.random.get_rng_state(), before)  # the process's stream is untouched


def test_seeds_are_distinct_over_seeds_epochs_and_images() -> None:
    seeds = {image_seed(s, e, i) for s in (0, 1, 2**20 + 3) for e in (0, 1, 99_999) for i in (0, 1, 9_999_999)}
    assert len(seeds) == 27 and max(seeds) < 2**62


def test_an_images_roi_sample_follows_its_draw_seed() -> None:
    labels = torch.cat([torch.ones(40, dtype=torch.long), torch.zeros(400, dtype=torch.long)])
    sampler = RandomSampler(num=64, pos_fraction=0.25)

    def sample(seed: int, stream: DrawStream = DrawStream.ROIS) -> torch.Tensor:
        torch.manual_seed(seed * 31 + 5)  # the process's RNG differs from call to call
        return sampler(labels, None, image_generator({DRAW_SEED: seed}, torch.device("cpu"), stream)).inds

    assert torch.equal(sample(11), sample(11))
    assert not torch.equal(sample(11), sample(12))
    assert not torch.equal(sample(11), sample(11, DrawStream.ANCHORS))  # the two streams are apart
    assert image_generator({}, torch.device("cpu"), DrawStream.ROIS) is None  # no seed: the process's RNG
