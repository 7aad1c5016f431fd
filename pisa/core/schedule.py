"""A training's schedule: the paper's presets (1x, 2x, ssd), the effective `Schedule` of a
training (a preset with its config's overrides, the LR scaled to the real batch), and the
LR factor at each iteration (linear warm-up, then steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """The effective schedule of a training: a paper preset with the config's overrides, and
    the learning rate scaled linearly from `base_batch` to the real total batch."""

    epochs: int
    lr: float
    base_batch: int
    milestones: tuple[int, ...]
    momentum: float
    weight_decay: float
    warmup_iters: int
    warmup_ratio: float
    gamma: float
    total_batch: int
    decay_norm_and_bias: bool = False  # weight decay on 1-D parameters too (mmdetection's SGD)

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.total_batch / self.base_batch


# The paper's schedules (supplement, Appendix B, and mmdetection's configs it ran). base_batch is
# the total batch the LR is for.
SCHEDULES: dict[str, dict[str, Any]] = {
    "1x": dict(
        epochs=12,
        lr=0.02,
        base_batch=16,
        milestones=[8, 11],
        momentum=0.9,
        weight_decay=1e-4,
        warmup_iters=500,
        warmup_ratio=0.001,
    ),
    "2x": dict(
        epochs=24,
        lr=0.02,
        base_batch=16,
        milestones=[16, 22],
        momentum=0.9,
        weight_decay=1e-4,
        warmup_iters=500,
        warmup_ratio=0.001,
    ),
    # lr: mmdetection's configs/ssd/ssd300_coco.py and ssd512_coco.py (2e-3 at 8 GPUs x 8 images),
    # which trained the published SSD numbers; the supplement's Appendix B says 1e-3
    "ssd": dict(
        epochs=120,
        lr=2e-3,
        base_batch=64,
        milestones=[80, 110],
        momentum=0.9,
        weight_decay=5e-4,
        warmup_iters=500,
        warmup_ratio=0.001,
    ),
}


def lr_factor(iteration: int, iters_per_epoch: int, schedule: Schedule) -> float:
    """Multiplier of the scaled LR at a global iteration: linear warm-up, then steps."""
    epoch = iteration // max(1, iters_per_epoch)
    factor = schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    warmup = schedule.warmup_iters
    if warmup and iteration < warmup:
        ratio = schedule.warmup_ratio
        factor *= ratio + (1.0 - ratio) * iteration / warmup
    return factor
